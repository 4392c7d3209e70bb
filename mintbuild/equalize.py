"""Activation-aware channel equalization: an exact rewrite of the model that round-to-nearest quantizes better.

A linear layer y = W x is unchanged if input channel c of W is multiplied by s_c and x_c divided by s_c. When
x comes from an RMSNorm (q/k/v from input_layernorm, gate/up from post_attention_layernorm) the division folds
into the norm's weight; when x is the output of another linear (down_proj reads up_proj's rows through the
gated activation, o_proj reads v_proj's rows through attention) it folds into that linear's rows. Channels that
carry large activations then get a finer share of their group's quantization grid (AWQ, Lin et al. 2023).

Per layer and per group of linears that read one input, we search s = mean|x|^a over a in `grid` points of
[0, 1] (a = 0 is plain RTN, so the search never does worse on the calibration sample) and keep the a that
minimises the output error sum_j |(Q(W_j s)/s - W_j) X^T|^2 on calibration tokens of the corpus *train* split
(never the test split that `mintbuild evaluate` scores), with Q the profile's own MLX quantizer at
`equalize.bits` / `equalize.group`. Every s is rounded to a power of two, so for a bf16, fp16 or fp32
checkpoint the rewritten weights are exact and the 16-bit model computes exactly the same function: the
16-bit baseline stays the baseline, and only quantization sees a difference.

The output is a model folder (config, tokenizer, model.safetensors, equalize.json with the chosen exponents,
the calibration error ratios and provenance) that profile, importance, allocate and pack read in place of the
model stage's folder. `equalize.method: none` writes a manifest that points at the original weights instead.
Supported: Llama-style decoders (llama, mistral, qwen2, qwen3 and the like: self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, RMSNorm weights that multiply); anything else is refused with `method: none` as the
way out.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts.model import copy_small_files, write_local_manifest
from .calibration import calibration_args, calibration_parser, calibration_windows, load_model, torch_settings
from .config import EqualizeConfig
from .errors import MintError
from .io import atomic_dir, atomic_write_json, sha256_file

SCHEMA_VERSION = 1
RECORD = "equalize.json"
WEIGHTS_FILE = "model.safetensors"
METHODS = ("awq", "none")
#: RMSNorm classes whose weight multiplies (x * w): a division folds into them. Gemma's (1 + w) does not.
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")

log = logging.getLogger(__name__)


@dataclass
class Group:
    """Linears that read one input, and where the inverse scale folds."""

    layer: int
    kind: str  # qkv | gate_up | down | o
    linears: list[str]  # module paths whose input columns are multiplied by s
    fold: str  # module path whose weight (norm: vector; linear: rows) is divided by s
    #: For o_proj under grouped-query attention: heads per kv head (they share scales) and the head size.
    share: int = 1
    head_dim: int = 0


def layer_groups(model: Any) -> list[Group]:
    """The equalization groups of a Llama-style decoder, or a MintError naming what does not fit."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise MintError(f"equalize: {type(model).__name__} has no model.layers; set equalize.method: none")
    cfg = model.config
    heads, kv_heads = (
        cfg.num_attention_heads,
        getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    groups = []
    for i, layer in enumerate(layers):
        _check_layer(i, layer, type(model).__name__)
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        groups += [
            Group(i, "qkv", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], f"{p}.input_layernorm"),
            Group(i, "gate_up", [f"{m}.gate_proj", f"{m}.up_proj"], f"{p}.post_attention_layernorm"),
            Group(i, "down", [f"{m}.down_proj"], f"{m}.up_proj"),
            Group(i, "o", [f"{a}.o_proj"], f"{a}.v_proj", heads // kv_heads, head_dim),
        ]
    return groups


def _check_layer(i: int, layer: Any, arch: str) -> None:
    need = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]  # fmt: skip
    modules = dict(layer.named_modules())
    missing = [n for n in need if n not in modules]
    if missing:
        raise MintError(
            f"equalize: layer {i} of {arch} has no {missing[0]} (not a Llama-style decoder); "
            "set equalize.method: none"
        )
    for norm in ("input_layernorm", "post_attention_layernorm"):
        name = type(modules[norm]).__name__
        if name not in _NORMS:
            raise MintError(
                f"equalize: layer {i} {norm} is a {name}, not a norm whose weight multiplies "
                f"({', '.join(_NORMS)}); set equalize.method: none"
            )


# ---------------------------------------------------------------- calibration statistics


@dataclass
class Stats:
    """Per group input: mean |x| per channel over every calibration token, and a token sample for the search."""

    mean_abs: Any  # torch float32 [C]
    sample: Any  # torch float32 [S, C]


def collect_stats(model: Any, groups: list[Group], windows: list[Any], samples: int, progress: bool) -> dict:
    """Forward the calibration windows once, hooking the first linear of every group."""
    import torch
    from tqdm import tqdm

    modules = dict(model.named_modules())
    n_tokens = sum(len(w.ids) for w in windows)
    step = max(1, math.ceil(n_tokens / samples))  # every step-th token goes to the search sample
    sums: dict[tuple[int, str], Any] = {}
    picked: dict[tuple[int, str], list[Any]] = {}

    def hook(key: tuple[int, str]) -> Any:
        def record(_m: Any, inputs: tuple[Any, ...], _out: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[key] = sums.get(key, 0) + x.abs().sum(0, dtype=torch.float64)
            picked.setdefault(key, []).append(x[::step].clone())

        return record

    handles = [modules[g.linears[0]].register_forward_hook(hook((g.layer, g.kind))) for g in groups]
    try:
        with torch.inference_mode():
            for w in tqdm(windows, unit="window", desc="equalize: calibration", disable=not progress):
                model(input_ids=torch.tensor(w.ids, dtype=torch.long)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: Stats((sums[k] / n_tokens).float(), torch.cat(picked[k])) for k in sums}


# ---------------------------------------------------------------- the search


def pow2_scales(mean_abs: Any, a: float, share: int = 1, head_dim: int = 0) -> Any:
    """s = mean|x|^a, centred (geometric mean of max and min = 1), rounded to powers of two.

    share > 1 (o_proj under grouped-query attention): the heads that read one kv head share their scales
    (input channel h * head_dim + j of those heads), because the inverse folds into that kv head's v_proj rows.
    """
    import torch

    m = mean_abs.clamp_min(1e-8)
    if share > 1:
        g = m.reshape(-1, share, head_dim).mean(1)
        m = g[:, None, :].expand(g.shape[0], share, head_dim).reshape(-1)
    s = m.pow(a)
    s = s / (s.max() * s.min()).sqrt()
    return torch.exp2(torch.round(torch.log2(s)))


@dataclass
class Metric:
    """The output-error metric of one group: |D x^T|^2 summed over the sample tokens x, for D = W' - W.

    From the sample's (randomized, seeded) SVD X = U diag(sigma) V^T: the top `rank` directions exactly, the rest as one
    isotropic remainder (their mean energy over the C - rank dimensions left, which also covers directions the
    sample never spans). One [O, C] x [C, rank] product per candidate instead of [O, C] x [C, S].
    """

    directions: Any  # [rank, C] float32, rows v_i
    energy: Any  # [rank] float64, sigma_i^2
    rest: float  # mean sigma^2 per remaining dimension

    @classmethod
    def of(cls, sample: Any, rank: int, seed: int) -> Metric:
        import torch

        k = min(rank, *sample.shape)
        # Randomized SVD (Halko et al.): ~10x a full SVD at C = 1536; seeded, so the result is deterministic.
        torch.manual_seed(seed)
        _, sigma, v = torch.svd_lowrank(sample, q=min(k + 32, *sample.shape), niter=2)
        energy = sigma[:k].double().square()
        left = sample.shape[1] - k
        total = float(sample.square().sum(dtype=torch.float64))
        rest = max(total - float(energy.sum()), 0.0) / left if left > 0 else 0.0
        return cls(v[:, :k].T.contiguous(), energy, rest)

    def __call__(self, d: Any) -> float:
        import torch

        proj = (d @ self.directions.T).square().sum(0, dtype=torch.float64)  # [rank]
        total = float(d.square().sum(dtype=torch.float64))
        return float((proj * self.energy).sum()) + self.rest * (total - float(proj.sum()))


def output_error(weights: list[Any], metric: Metric, s: Any, option: Any) -> float:
    """sum_j |(Q(W_j s)/s - W_j) x^T|^2 over the sample, with Q the profile's quantizer (storage dtype bf16)."""
    from .quant.reference import quantize_dequantize

    return sum(metric(quantize_dequantize(w * s, option).float() / s - w) for w in weights)


def search(
    weights: list[Any], stats: Stats, group: Group, option: Any, grid: int, rank: int, seed: int = 0
) -> tuple[float, Any, float]:
    """(exponent, scales, error ratio vs plain RTN) minimising the output error on the sample."""
    import torch

    metric = Metric.of(stats.sample, rank, seed)
    best = (0.0, torch.ones_like(stats.mean_abs), math.inf)
    base = None
    for a in [k / (grid - 1) for k in range(grid)] if grid > 1 else [0.0]:
        s = pow2_scales(stats.mean_abs, a, group.share, group.head_dim)
        err = output_error(weights, metric, s, option)
        base = err if base is None else base
        if err < best[2]:
            best = (a, s, err)
    return best[0], best[1], best[2] / base if base else 1.0


def equalize_model(
    model: Any, groups: list[Group], stats: dict, cfg: EqualizeConfig, progress: bool
) -> list[dict]:
    """Search and apply every group's scales in place (layer order); one record per group."""
    import torch
    from tqdm import tqdm

    from .formats import Option

    option = Option(cfg.bits, cfg.group)
    modules = dict(model.named_modules())
    records = []
    with torch.no_grad():
        for g in tqdm(groups, unit="group", desc="equalize: search", disable=not progress):
            weights = [modules[n].weight for n in g.linears]
            a, s, ratio = search(
                [w.float() for w in weights],
                stats[(g.layer, g.kind)],
                g,
                option,
                cfg.grid,
                cfg.rank,
                cfg.seed,
            )
            for w in weights:
                w.mul_(s)
            _fold(modules[g.fold], s, g)
            records.append({"layer": g.layer, "group": g.kind, "exponent": round(a, 4),
                            "error_ratio": float(f"{ratio:.6g}"), "fold": g.fold})  # fmt: skip
    return records


def _fold(module: Any, s: Any, g: Group) -> None:
    """Divide the producer of the group's input by s: a norm's weight, or a linear's rows (and bias)."""
    if g.share > 1:  # one scale per kv-head channel: the first head of each share-group carries it
        s = s.reshape(-1, g.share, g.head_dim)[:, 0, :].reshape(-1)
    if module.weight.ndim == 1:
        module.weight.div_(s)
        return
    module.weight.div_(s[:, None])
    if getattr(module, "bias", None) is not None:
        module.bias.div_(s)


# ---------------------------------------------------------------- the stage


def run(model_dir: Path, corpus_dir: Path, cfg: EqualizeConfig, out: Path, progress: bool = True) -> dict:
    """Write the equalized model folder `out` (or, for method none, a manifest naming `model_dir`)."""
    if cfg.method not in METHODS:
        raise MintError(f"equalize.method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    model_dir, out = Path(model_dir), Path(out)
    if cfg.method == "none":
        return _passthrough(model_dir, out)
    record, tensors = compute(model_dir, Path(corpus_dir), cfg, progress)
    with atomic_dir(out) as tmp:
        copy_small_files(model_dir, tmp)
        _save(tensors, tmp / WEIGHTS_FILE)
        atomic_write_json(tmp / RECORD, record)
        manifest = {"schema_version": 1, "source": "equalize", "method": cfg.method,
                    "files": {WEIGHTS_FILE: {"sha256": sha256_file(tmp / WEIGHTS_FILE)}}}  # fmt: skip
        atomic_write_json(tmp / "manifest.json", manifest)
    s = record["summary"]
    log.info("equalized %d groups: output error %.3f of plain RTN on the calibration sample (median %.3f); %s",
             s["groups"], s["error_ratio_mean"], s["error_ratio_median"], out)  # fmt: skip
    return record


def compute(model_dir: Path, corpus_dir: Path, cfg: EqualizeConfig, progress: bool) -> tuple[dict, dict]:
    """(equalize.json record, every checkpoint tensor in its stored dtype with the rewritten ones replaced)."""
    import numpy as np
    import torch

    from .checkpoint import fingerprint

    ckpt, windows, train_sha = calibration_windows(model_dir, corpus_dir, cfg.n_windows, cfg.window, cfg.seed)
    with torch_settings(cfg.threads):
        t0 = time.perf_counter()
        model = load_model(model_dir)
        groups = layer_groups(model)
        stats = collect_stats(model, groups, windows, cfg.samples, progress)
        t1 = time.perf_counter()
        records = equalize_model(model, groups, stats, cfg, progress)
        t2 = time.perf_counter()
    log.info(
        "calibration %.1f s, search %.1f s (%d groups x %d exponents)",
        t1 - t0,
        t2 - t1,
        len(groups),
        cfg.grid,
    )
    tensors = rewritten_tensors(model, groups, ckpt)
    ratios = [r["error_ratio"] for r in records]
    record = {
        "schema_version": SCHEMA_VERSION,
        "method": "awq: per group s = mean|x|^a, a searched on a grid of [0, 1], powers of two (exact rewrite)",
        "provenance": {
            "model_fingerprint": fingerprint(ckpt),
            "corpus_split": "train",
            "corpus_train_sha256": train_sha,
            "tokens": sum(len(w.ids) for w in windows),
            "search_option": f"q{cfg.bits}g{cfg.group}",
            "grid": cfg.grid,
            "samples": cfg.samples,
            "seed": cfg.seed,
            "mintbuild_version": __version__,
            "torch_version": torch.__version__,
        },
        "windows": [
            {"char_start": w.char_start, "char_end": w.char_end, "tokens": len(w.ids)} for w in windows
        ],
        "summary": {
            "groups": len(records),
            "error_ratio_mean": float(f"{np.mean(ratios):.6g}"),
            "error_ratio_median": float(f"{np.median(ratios):.6g}"),
            "unchanged": sum(r["exponent"] == 0 for r in records),
        },
        "groups": records,
    }
    return record, tensors


def rewritten_tensors(model: Any, groups: list[Group], ckpt: Any) -> dict[str, Any]:
    """Every checkpoint tensor in its stored dtype; the rewritten ones from the model, checked exact."""
    touched = set()
    for g in groups:
        touched.update(f"{n}.weight" for n in g.linears)
        touched.update({f"{g.fold}.weight", f"{g.fold}.bias"})
    params = dict(model.named_parameters())
    out = {}
    for name in ckpt.names:
        stored = ckpt.read(name)
        if name not in touched or name not in params:
            out[name] = stored
            continue
        new = params[name].detach()
        cast = new.to(stored.dtype)
        # Power-of-two scales are exact unless a value leaves the dtype's range: refuse rather than round.
        if not bool((cast.float() == new.float()).all()) or not bool(cast.isfinite().all()):
            raise MintError(f"equalize: {name} is not exactly representable in {stored.dtype} after scaling")
        out[name] = cast.contiguous()
    missing = sorted(n for n in touched if n.endswith(".weight") and n not in ckpt.tensors)
    if missing:
        raise MintError(f"equalize: the checkpoint has no tensor {missing[0]} (the model names it)")
    return out


def _save(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})


def _passthrough(model_dir: Path, out: Path) -> dict:
    """method none: the model stage's own local-folder manifest naming `model_dir` (nothing is copied)."""
    manifest = write_local_manifest(model_dir, out)
    log.info("equalize.method none: %s points at %s", out, model_dir)
    return manifest


# ---------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    calibration_parser(p, "model", "equalize.out")


def main(args: argparse.Namespace) -> None:
    params, model_dir, corpus_dir = calibration_args(args, "model")
    run(model_dir, corpus_dir, params.equalize, Path(args.out or params.equalize.out), not args.no_progress)
