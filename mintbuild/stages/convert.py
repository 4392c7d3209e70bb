"""`mintbuild convert`: the equalized HF folder as a bf16 GGUF, written by llama.cpp's own converter.

One job: run `convert_hf_to_gguf.py` of the built llama.cpp (mintbuild.llamacpp.build; its gguf-py beside it) as a
subprocess on the weights folder with `--outtype bf16` (it reads tensors lazily, one at a time) and record what
came out. Every GGUF option of `mintbuild profile --format gguf` and of `mintbuild pack` is quantized from this
file by llama.cpp's own code, so names, shapes, Q/K row order and metadata are the converter's.

A model the converter does not take (an architecture it does not know, named with its model type before any
work; or the converter's own error, e.g. a tokenizer file it needs) is a fact about the model, not a failed
build: convert.json records the converter's one-line reason, a warning says so, and every GGUF target of the
build is recorded as not built with that reason (mintbuild.artifacts.not_built) while the MLX targets build.
With `convert.enabled: false` (a build with no GGUF target) the stage only writes convert.json saying so.
The output folder (model.gguf + convert.json: the sha256 of the input weights and config, the converter's
version, the file's sha256, its data offset and tensor count) replaces the previous one atomically.
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mintbuild import __version__
from mintbuild.artifacts.convert import CONVERT_FILE, DISABLED, GGUF_FILE, SCHEMA_VERSION, failure_record
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.config import ConvertConfig, load_params
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import fingerprint, open_checkpoint
from mintbuild.io import atomic_dir, canonical_json, sha256_file

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"


class ConverterRefused(MintError):
    """llama.cpp's converter does not take this model (its architecture, its tokenizer, ...): a fact about the
    model, recorded in convert.json, not a failure of the build."""


#: Output types the converter writes that mintbuild quantizes from (16-bit, lossless for a bf16 checkpoint).
OUTTYPES = ("bf16", "f16", "f32")


@functools.cache
def supported_architectures(python_dir: Path) -> frozenset[str]:
    """The HF architectures (config.json `architectures[0]`) the converter of `python_dir` knows: the keys of
    its `conversion.TEXT_MODEL_MAP`, read from the source (no torch import)."""
    src = Path(python_dir) / "conversion" / "__init__.py"
    try:
        tree = ast.parse(src.read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as e:
        raise MintError(f"{src}: cannot read llama.cpp's converter ({e})") from None
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and value is not None:
            return frozenset(ast.literal_eval(value))
    raise MintError(f"{src}: no TEXT_MODEL_MAP (llama.cpp's converter changed its layout)")


def model_architecture(config: dict[str, Any]) -> str | None:
    """The architecture the converter dispatches on (its `get_model_architecture` for a text model)."""
    text = config.get("text_config") or {}
    if text.get("architectures"):
        return str(text["architectures"][0])
    arches = config.get("architectures") or []
    return str(arches[0]) if arches else None


def check_convertible(model_dir: Path, python_dir: Path) -> str:
    """The model's architecture, or a MintError naming its model type when the converter does not know it."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MintError(f"{path}: cannot read the model config ({e})") from None
    arch = model_architecture(config)
    model_type = config.get("model_type", "(none)")
    if arch is None:
        raise ConverterRefused(
            f"{path}: model type {model_type!r} names no architecture; llama.cpp cannot convert it"
        )
    if arch not in supported_architectures(python_dir):
        raise ConverterRefused(
            f"{path}: model type {model_type!r} (architecture {arch}) is not one llama.cpp's converter knows; "
            "no GGUF can be built for it"
        )
    return arch


def input_hash(model_dir: Path) -> dict[str, str]:
    """sha256 of every file the converter reads for the weights and hyperparameters."""
    files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.json"))
    return {p.name: sha256_file(p) for p in files if p.is_file()}


def _last_error(lines: list[str]) -> str:
    for ln in reversed(lines):
        if any(w in ln for w in ("Error", "error", "ERROR", "Exception")):
            return ln.strip()
    return lines[-1].strip() if lines else "(no output)"


def run_converter(python_dir: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    """Run llama.cpp's converter; its log goes to ours (debug); a failure is one line with its last error."""
    cmd = [sys.executable, str(python_dir / CONVERTER), str(model_dir), "--outfile", str(outfile)]
    cmd += ["--outtype", outtype]
    log.debug("running %s", " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                if "INFO:hf-to-gguf:" in line or "gguf_writer" in line:
                    log.debug("%s", line)
        code = proc.wait()
    if code != 0:
        # an error the converter raised is about the model; a signal (killed, out of memory) is about the machine
        error = ConverterRefused if code > 0 else MintError
        raise error(f"{CONVERTER} failed (exit {code}): {_last_error(list(tail))}")


def gguf_facts(path: Path) -> dict[str, Any]:
    """Architecture, block count, data offset, tensor count and types of a GGUF (memory-mapped)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    block_count = reader.fields.get(f"{arch}.block_count")
    return {
        "architecture": arch,
        "block_count": int(block_count.contents()) if block_count is not None else 0,
        "data_offset": int(reader.data_offset),
        "tensors": len(reader.tensors),
        "types": dict(sorted(types.items())),
    }


def convert(model_dir: Path, cfg: ConvertConfig, out: Path) -> dict[str, Any]:
    """Convert `model_dir` (an HF folder) into `out`/model.gguf with llama.cpp's converter; returns convert.json."""
    from mintbuild.llamacpp.build import ensure_llamacpp

    if not cfg.enabled:
        doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "enabled": False, "note": DISABLED}
        with atomic_dir(out) as tmp:
            (tmp / CONVERT_FILE).write_text(canonical_json(doc), encoding="utf-8")
        log.info("convert.enabled is false: no GGUF converted (%s)", out / CONVERT_FILE)
        return doc
    if cfg.outtype not in OUTTYPES:
        raise MintError(f"convert.outtype {cfg.outtype!r}: choose one of {list(OUTTYPES)}")
    model_dir = Path(model_dir)
    paths = ensure_llamacpp()
    ckpt = open_checkpoint(model_dir)
    if ckpt.config.get("quantization_config"):
        raise MintError(f"{model_dir}/config.json has a quantization_config: convert a 16-bit checkpoint")
    try:
        arch = check_convertible(model_dir, paths.python_dir)
        with atomic_dir(out) as tmp:
            return _convert(paths.python_dir, model_dir, ckpt, arch, cfg, out, tmp)
    except ConverterRefused as e:  # the model, not the build: MLX targets go on, GGUF targets say why
        doc = failure_record(str(e))
        with atomic_dir(out) as tmp:
            (tmp / CONVERT_FILE).write_text(canonical_json(doc), encoding="utf-8")
        log.warning("no GGUF for this model, its GGUF targets will not be built: %s", e)
        return doc


def _convert(
    python_dir: Path, model_dir: Path, ckpt: Any, arch: str, cfg: ConvertConfig, out: Path, tmp: Path
) -> dict[str, Any]:
    """Run the converter into `tmp` (the folder that replaces `out`) and write convert.json there."""
    from mintbuild.llamacpp.build import build_name

    t0 = time.perf_counter()
    log.info("converting %s (%s) to a %s GGUF with llama.cpp's converter", model_dir, arch, cfg.outtype)
    run_converter(python_dir, model_dir, tmp / GGUF_FILE, cfg.outtype)
    seconds = time.perf_counter() - t0
    facts = gguf_facts(tmp / GGUF_FILE)
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "architecture": arch,
        "outtype": cfg.outtype,
        "provenance": {
            "model_folder": model_dir.name,
            "model_fingerprint": fingerprint(ckpt),
            "inputs_sha256": input_hash(model_dir),
            "converter": f"llama.cpp {build_name()} {CONVERTER}",
            "mintbuild_version": __version__,
        },
        "gguf": {
            "file": GGUF_FILE,
            "bytes": (tmp / GGUF_FILE).stat().st_size,
            "sha256": sha256_file(tmp / GGUF_FILE),
            **facts,
        },
    }
    # (the converter's time is logged, not written: the folder is one DVC out, hashed whole)
    (tmp / CONVERT_FILE).write_text(canonical_json(doc), encoding="utf-8")
    log.info(
        "wrote %s: %s, %d tensors, %s B in %.1f s",
        out / GGUF_FILE,
        facts["architecture"],
        facts["tensors"],
        f"{doc['gguf']['bytes']:,}",
        seconds,
    )
    return doc


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--model", help="HF folder to convert (default: the equalize stage's output)")
    p.add_argument("--out", help="output folder (default: convert.out from params)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry; the converter is quiet")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    model_dir = Path(args.model) if args.model else resolve_weights_dir(Path(params.equalize.out))
    convert(model_dir, params.convert, Path(args.out or params.convert.out))
