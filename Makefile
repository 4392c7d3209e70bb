# Set-up is part of every target: a fresh machine needs only `make build` or `make test`.
# torch is installed first and pinned to the local CPU build; an unpinned torch would pull a multi-GB CUDA wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
# numba's compiled-kernel cache and the downloaded wheels stay inside the checkout.
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba
export MINTBUILD_CACHE ?= $(CURDIR)/.cache/mintbuild

.PHONY: setup llamacpp build test test-fast lint bench quality clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## llamacpp: llama.cpp's libraries and tools (quantize, perplexity, imatrix, completion) built once from the pinned
## PyPI sdist into $(MINTBUILD_CACHE)/llama.cpp/ (minutes, the first time only; a no-op when cached)
llamacpp: setup
	$(BIN)/python -m mintbuild.llamacpp.build > /dev/null

## build: the whole default pipeline (dvc repro), then the budget table
build: setup llamacpp
	$(BIN)/mintbuild compose --check
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	cat artifacts/report/report.md

## test: lint, then the whole test suite
test: setup lint llamacpp
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -n 2 --dist loadfile --durations=15

## test-fast: the unit tests only (about two minutes): every test marked e2e (the real model, DVC, llama.cpp,
## mlx-lm or over ~5 s) is skipped; `make test` runs them
test-fast: setup llamacpp
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m "not e2e" --durations=10

## lint: ruff, then mypy over the package (configured in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_solve.py
	$(BIN)/python benchmarks/bench_profile.py

## quality: mintbuild vs uniform MLX, mlx-lm recipes, mlx-lm's calibrated peers (AWQ, GPTQ, dynamic_quant) and the
## published greedy at equal bytes (~1-1.5 h here the first time, most of it AWQ; peer folders are then cached in
## $MINTBUILD_CACHE/peers; `--peers none` for the ~12 min without peers), and
## llama.cpp's stock GGUF mixes (Q3_K_M, Q4_K_M, Q5_K_M, with the imatrix and without) vs mintbuild GGUFs at their
## bytes (`--gguf none` skips them)
quality: setup llamacpp
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro profile importance convert profile_gguf
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf artifacts .cache $(VENV)
