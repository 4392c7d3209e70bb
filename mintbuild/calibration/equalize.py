"""Activation-aware channel equalization: an exact rewrite of the model that round-to-nearest quantizes better.

A linear layer y = W x is unchanged if input channel c of W is multiplied by s_c and x_c divided by s_c. When
x comes from an RMSNorm (q/k/v from input_layernorm, gate/up from post_attention_layernorm) the division folds
into the norm's weight; when x is the output of another linear (down_proj reads up_proj's rows through the
gated activation, o_proj reads v_proj's rows through attention) it folds into that linear's rows. Channels that
carry large activations then get a finer share of their group's quantization grid (AWQ, Lin et al. 2023).

Per layer and per group of linears that read one input, we search s = mean|x|^a over a in `grid` points of
[0, 1] (a = 0 is plain RTN, so the search never does worse on the calibration sample) and keep the a that
minimises the output error sum_j |(Q(W_j s)/s - W_j) X^T|^2 on calibration tokens of the corpus *train* split
(never the test split that `mintbuild evaluate` scores; over a seeded sample of `search_rows` output rows of a
wider linear), with Q the profile's own MLX quantizer at
`equalize.bits` / `equalize.group`. The search is screened (`screened_search`): every exponent on a small row
sample first; a group the screen gains less than `skip_below` of its error keeps s = 1, the others walk
from the screen's best to a local minimum on the search rows (~3x less work where it pays, ~10x where
it cannot). Every s is rounded to a power of two, so for a bf16, fp16 or fp32
checkpoint the rewritten weights are exact and the 16-bit model computes exactly the same function: the
16-bit baseline stays the baseline, and only quantization sees a difference.

The output is a model folder (config, tokenizer, model.safetensors, equalize.json with the chosen exponents,
the calibration error ratios and provenance) that profile, importance, allocate and pack read in place of the
model stage's folder. `equalize.method: none` writes a manifest that points at the original weights instead.
Every producer/consumer pair that can be rewritten exactly is equalized, whatever the family: norms whose weight
multiplies (x * w) and Gemma's (1 + w) norms (a channel whose rescaled 1 + w is not exactly storable keeps s = 1),
separate or fused projections (Phi-3's qkv_proj and gate_up_proj by their row ranges); MoE MLP blocks are
skipped. equalize.json lists what was skipped and why; a model with nothing to equalize builds unequalized, with
one warning.

The model is never whole in memory: it streams one decoder block at a time (mintbuild.hf.streaming). Every
calibration window passes block l, whose hooks collect that block's statistics, before block l is searched,
folded in fp32 and its rewritten tensors written into model.safetensors (mintbuild.hf.safetensors_out: the bytes
`safetensors.save_file` would write for the whole dict); then block l + 1 is read. Peak memory: one block in
fp32, the embedding and head, and the windows' hidden states.

One job: the equalization, from finding the pairs of a family to the exact rewrite (pairs, calibration
statistics, the exponent search, the folds).
"""

from __future__ import annotations

import gc
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mintbuild import __version__
from mintbuild.calibration.windows import (
    calibration_windows,
    torch_settings,
)
from mintbuild.config import EqualizeConfig
from mintbuild.errors import MintError
from mintbuild.hf.safetensors_out import StreamedSafetensors
from mintbuild.reproducible import one_torch_thread, sum64, sum_squares64

log = logging.getLogger(__name__)


#: equalize.json's layout; 2: each group's screen_ratio and skipped, the screen's settings in provenance.
SCHEMA_VERSION = 2


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
    #: How the fold module makes the input: "scale" (a norm, x_hat * w), "offset" (a norm, x_hat * (1 + w):
    #: Gemma's), "linear" (rows of a linear layer).
    fold_kind: str = "linear"
    #: Rows [start, stop) of a fused fold linear (Phi-3's qkv_proj and gate_up_proj) that make this input.
    rows: tuple[int, int] | None = None


def layer_groups(model: Any) -> tuple[list[Group], list[dict[str, Any]]]:
    """(the equalization groups of a decoder, the pairs skipped with the reason). Every producer/consumer pair
    whose rewrite is exact is a group: the attention and MLP input norms (a norm that multiplies, or Gemma's
    (1 + w), checked by probing the module, not by its name) into the projections that read them, the value
    rows into o_proj, the up rows into down_proj; fused projections (Phi-3) by their row ranges. MoE MLP blocks
    (the router and every expert read one input) are skipped."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return [], [{"layer": None, "pair": "all", "reason": f"{type(model).__name__} has no model.layers"}]
    groups: list[Group] = []
    skipped: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        g, s = block_groups(i, layer, model.config)
        groups += g
        skipped += s
    return groups, skipped


def block_groups(i: int, block: Any, cfg: Any) -> tuple[list[Group], list[dict[str, Any]]]:
    """`layer_groups` of decoder block `i` alone (its weights materialized: norms are probed), `cfg` the
    transformers config."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return _layer_pairs(i, dict(block.named_modules()), heads, kv_heads, head_dim)


def _layer_pairs(
    i: int, mods: dict[str, Any], heads: int, kv_heads: int, head_dim: int
) -> tuple[list[Group], list[dict[str, Any]]]:
    p = f"model.layers.{i}"
    groups, skipped = [], []

    def skip(pair: str, reason: str) -> None:
        skipped.append({"layer": i, "pair": pair, "reason": reason})

    q, kv = heads * head_dim, kv_heads * head_dim
    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    if all(_linear(mods, n) for n in attn):
        readers, v_fold, v_rows = attn, "self_attn.v_proj", None
    elif _linear(mods, "self_attn.qkv_proj"):
        readers, v_fold, v_rows = ["self_attn.qkv_proj"], "self_attn.qkv_proj", (q + kv, q + 2 * kv)
    else:
        readers, v_fold, v_rows = None, None, None
    mlp_norm = (
        "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in mods else "post_attention_layernorm"
    )
    moe = any(n.startswith("mlp.experts") for n in mods)
    if moe:
        mlp_readers = up_fold = up_rows = None
    elif _linear(mods, "mlp.gate_proj") and _linear(mods, "mlp.up_proj"):
        mlp_readers, up_fold, up_rows = ["mlp.gate_proj", "mlp.up_proj"], "mlp.up_proj", None
    elif _linear(mods, "mlp.gate_up_proj"):
        inter = mods["mlp.gate_up_proj"].weight.shape[0] // 2  # Phi-3: gate rows, then up rows
        mlp_readers, up_fold, up_rows = ["mlp.gate_up_proj"], "mlp.gate_up_proj", (inter, 2 * inter)
    else:
        mlp_readers = up_fold = up_rows = None
    for kind, norm, reader in (("qkv", "input_layernorm", readers), ("gate_up", mlp_norm, mlp_readers)):
        if reader is None:
            skip(kind, "MoE block: the router and every expert read this input" if moe and kind == "gate_up"
                 else "no separate or fused projections of a known layout")  # fmt: skip
            continue
        how = norm_kind(mods.get(norm))
        if how is None:
            skip(kind, f"{norm} is not a norm whose weight multiplies (x * w or x * (1 + w))")
            continue
        groups.append(Group(i, kind, [f"{p}.{n}" for n in reader], f"{p}.{norm}", fold_kind=how))
    if up_fold and _linear(mods, "mlp.down_proj"):
        groups.append(Group(i, "down", [f"{p}.mlp.down_proj"], f"{p}.{up_fold}", rows=up_rows))
    else:
        skip(
            "down", "MoE block: one scale would have to fold into every expert" if moe else "no up/down pair"
        )
    if v_fold and _linear(mods, "self_attn.o_proj"):
        fold = f"{p}.{v_fold}"
        groups.append(
            Group(i, "o", [f"{p}.self_attn.o_proj"], fold, heads // kv_heads, head_dim, rows=v_rows)
        )
    else:
        skip("o", "no v_proj/o_proj pair")
    return groups, skipped


def _linear(mods: dict[str, Any], name: str) -> bool:
    import torch

    return isinstance(mods.get(name), torch.nn.Linear)


def norm_kind(module: Any) -> str | None:
    """How a norm applies its weight, found by probing it: "scale" (x_hat * w: output 0 when w = 0), "offset"
    (x_hat * (1 + w): Gemma's; output x_hat when w = 0), or None (no weight vector, or neither)."""
    import torch

    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 1:
        return None
    x = torch.linspace(-2.0, 3.0, 2 * w.shape[0]).reshape(2, -1).to(w.dtype)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.zero_()
            y0 = module(x).float()
            w.fill_(1.0)
            y1 = module(x).float()
    except Exception:  # a module that is not a plain norm over the last dimension
        return None
    finally:
        with torch.no_grad():
            w.copy_(saved)
    if bool((y0 == 0).all()) and bool(y1.abs().gt(0).any()):
        return "scale"
    if bool(y0.abs().gt(0).any()) and torch.allclose(y1, 2 * y0, rtol=1e-5, atol=1e-6):
        return "offset"
    return None


@dataclass
class Stats:
    """Per group input: mean |x| per channel over every calibration token, and a token sample for the search."""

    mean_abs: Any  # torch float32 [C]
    sample: Any  # torch float32 [S, C]


class StatsRecorder:
    """Forward hooks on the first linear of every group while in a `with`: per input channel, sum |x| over every
    token (fixed-order float64), and every step-th token for the search sample."""

    def __init__(self, modules: dict[str, Any], groups: list[Group], step: int) -> None:
        self.modules, self.groups, self.step = modules, groups, step
        self.sums: dict[tuple[int, str], Any] = {}
        self.picked: dict[tuple[int, str], list[Any]] = {}
        self.handles: list[Any] = []

    def _hook(self, key: tuple[int, str]) -> Any:
        def record(_m: Any, inputs: tuple[Any, ...], _out: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            self.sums[key] = self.sums.get(key, 0) + sum64(x.abs(), axis=0)
            self.picked.setdefault(key, []).append(x[:: self.step].clone())

        return record

    def __enter__(self) -> StatsRecorder:
        self.handles = [
            self.modules[g.linears[0]].register_forward_hook(self._hook((g.layer, g.kind)))
            for g in self.groups
        ]
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self.handles:
            h.remove()

    def stats(self, n_tokens: int) -> dict[tuple[int, str], Stats]:
        import torch

        return {k: Stats((v / n_tokens).float(), torch.cat(self.picked[k])) for k, v in self.sums.items()}


def block_stats(
    block: Any,
    modules: dict[str, Any],
    groups: list[Group],
    hidden: list[Any],
    calls: list[Any],
    step: int,
    n_tokens: int,
) -> tuple[dict, list[Any]]:
    """(this block's statistics, the block's outputs): every window's hidden state through the block, in
    window order, hooking the first linear of every group. Every step-th token goes to the search sample."""
    import torch

    from mintbuild.hf.streaming import run_block

    with StatsRecorder(modules, groups, step) as rec, torch.inference_mode():
        out = [run_block(block, h, c) for h, c in zip(hidden, calls, strict=True)]
    return rec.stats(n_tokens), out


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
        # Randomized SVD (Halko et al.): ~10x a full SVD at C = 1536; seeded, and on one thread (its LAPACK
        # calls round differently with more), so the result is the same whatever the thread count.
        torch.manual_seed(seed)
        with one_torch_thread():
            _, sigma, v = torch.svd_lowrank(sample, q=min(k + 32, *sample.shape), niter=2)
        energy = sigma[:k].double().square()
        left = sample.shape[1] - k
        total = sum_squares64(sample)
        rest = max(total - float(energy.sum()), 0.0) / left if left > 0 else 0.0
        return cls(v[:, :k].T.contiguous(), energy, rest)

    def __call__(self, d: Any) -> float:

        proj = sum_squares64(d @ self.directions.T, axis=0)  # [rank]
        total = sum_squares64(d)
        return sum64(proj * self.energy) + self.rest * (total - sum64(proj))


def output_error(weights: list[Any], metric: Metric, s: Any, option: Any) -> float:
    """sum_j |(Q(W_j s)/s - W_j) x^T|^2 over the sample, with Q the profile's quantizer (storage dtype bf16)."""
    from mintbuild.mlx.quant.reference import quantize_dequantize

    return sum(metric(quantize_dequantize(w * s, option).float() / s - w) for w in weights)


def exponents(grid: int) -> list[float]:
    """The exponents searched: `grid` points evenly spaced on [0, 1], 0 (plain RTN) first."""
    return [k / (grid - 1) for k in range(grid)] if grid > 1 else [0.0]


class Errors:
    """The output error of one group for an exponent a (`output_error` of its scales on `weights`), each
    exponent measured once."""

    def __init__(
        self,
        weights: list[Any],
        stats: Stats,
        group: Group,
        option: Any,
        metric: Metric,
        restrict: Any = None,
    ) -> None:
        self.weights, self.stats, self.group, self.option = weights, stats, group, option
        self.metric, self.restrict = metric, restrict
        self.seen: dict[float, tuple[Any, float]] = {}

    def __call__(self, a: float) -> float:
        if a not in self.seen:
            s = pow2_scales(self.stats.mean_abs, a, self.group.share, self.group.head_dim)
            if self.restrict is not None:
                s = self.restrict(s)
            self.seen[a] = (s, output_error(self.weights, self.metric, s, self.option))
        return self.seen[a][1]

    def best(self) -> tuple[float, Any, float]:
        """(exponent, scales, error ratio vs a = 0) of the lowest error measured (the smallest a on a tie)."""
        base = self(0.0)
        a = min(sorted(self.seen), key=lambda k: self.seen[k][1])
        s, err = self.seen[a]
        return a, s, err / base if base else 1.0


def search(
    weights: list[Any],
    stats: Stats,
    group: Group,
    option: Any,
    grid: int,
    rank: int,
    seed: int = 0,
    restrict: Any = None,
    metric: Metric | None = None,
) -> tuple[float, Any, float]:
    """(exponent, scales, error ratio vs plain RTN) minimising the output error on the sample over every
    exponent of the grid. `restrict` maps candidate scales to the ones the fold can take exactly (Gemma's
    (1 + w) norms: `offset_restriction`)."""
    errors = Errors(weights, stats, group, option, metric or Metric.of(stats.sample, rank, seed), restrict)
    for a in exponents(grid):
        errors(a)
    return errors.best()


def descend(errors: Errors, grid: list[float], start: float) -> tuple[float, Any, float]:
    """`errors.best()` after a walk on the grid from `start`: measure both neighbours, move to the lower one
    while it is lower, stop at a grid point no neighbour beats (a local minimum of the error on the grid)."""
    k = grid.index(start)
    while True:
        around = [j for j in (k - 1, k, k + 1) if 0 <= j < len(grid)]
        j = min(around, key=lambda i: (errors(grid[i]), i))
        if j == k:
            return errors.best()
        k = j


def screened_search(
    weights: list[Any], stats: Stats, g: Group, option: Any, cfg: EqualizeConfig, restrict: Any = None
) -> tuple[float, Any, float, float, bool]:
    """(exponent, scales, error ratio vs plain RTN on the search rows, the screen's ratio, whether the rule
    left the group unscaled): `search` in two steps whose cost is a few full evaluations instead of `grid`.

    1. Screen: every exponent of the grid on a seeded sample of `screen_rows` rows of each linear (the error is
       a sum over rows, so a sample estimates the ratio; it costs `screen_rows / rows` of a full evaluation).
    2. A group whose screened best lowers the error by less than `skip_below` (ratio > 1 - skip_below) cannot
       pay for the rest: it keeps s = 1 (plain RTN, ratio 1 by definition). Otherwise, on the search rows
       (`search_rows`), a = 0 (the base) and a walk from the screen's best to a local minimum of the grid
       (`descend`): the full search's answer whenever the error has no other minimum on the grid between the
       two, whatever the screen's noise.
    `screen_rows: 0`, or a group whose screen would measure more than a quarter of its search rows (SmolLM2's
    576-960-row groups: the screen and the walk would cost more evaluations than the grid), is searched
    exhaustively."""
    import torch

    metric = Metric.of(stats.sample, cfg.rank, cfg.seed)
    full = [search_rows(w, cfg.search_rows, cfg.seed, g, j) for j, w in enumerate(weights)]
    screened_rows = sum(min(f.shape[0], cfg.screen_rows) for f in full)
    if not cfg.screen_rows or 4 * screened_rows > sum(f.shape[0] for f in full):
        a, s, ratio = search(full, stats, g, option, cfg.grid, cfg.rank, cfg.seed, restrict, metric)
        return a, s, ratio, ratio, False
    sample = [search_rows(f, cfg.screen_rows, cfg.seed + 1, g, j) for j, f in enumerate(full)]
    a, _, screen = search(sample, stats, g, option, cfg.grid, cfg.rank, cfg.seed, restrict, metric)
    if screen > 1.0 - cfg.skip_below:
        return 0.0, torch.ones_like(stats.mean_abs), 1.0, screen, True
    a, s, ratio = descend(Errors(full, stats, g, option, metric, restrict), exponents(cfg.grid), a)
    return a, s, ratio, screen, False


def offset_weight(w: Any, s: Any, dtype: Any) -> tuple[Any, Any]:
    """For a (1 + w) norm divided by s: (w' in `dtype`, as float32, where 1 + w' = (1 + w) / s exactly in the
    float32 the norm computes in; mask of the channels where such a w' exists). Channels with s = 1 keep w."""
    import torch

    target = (1.0 + w.float()) / s  # exact: s is a power of two
    new = (target.double() - 1.0).to(dtype).float()
    ok = (s == 1) | ((1.0 + new) == target)
    return torch.where(s == 1, w.float(), new), ok


def offset_restriction(w: Any, dtype: Any) -> Any:
    """The scales a (1 + w) norm can fold exactly: s where `offset_weight` finds a storable w', else 1."""
    import torch

    def restrict(s: Any) -> Any:
        return torch.where(offset_weight(w, s, dtype)[1], s, torch.ones_like(s))

    return restrict


def equalize_groups(
    modules: dict[str, Any], groups: list[Group], stats: dict, cfg: EqualizeConfig, dtypes: dict[str, Any]
) -> list[dict]:
    """Search and apply every group's scales in place, in the order given (within a layer, a group's search
    sees the folds of the groups before it); one record per group. `modules`: module path -> module, for
    every path the groups name; `dtypes`: the storage dtype of each checkpoint tensor (a (1 + w) norm's
    rewrite must be exact in it)."""
    import torch

    from mintbuild.formats import Option

    option = Option(cfg.bits, cfg.group)
    records = []
    with torch.no_grad():
        for g in groups:
            weights = [modules[n].weight for n in g.linears]
            norm_w = modules[g.fold].weight
            restrict = None
            if g.fold_kind == "offset":
                restrict = offset_restriction(norm_w.detach(), dtypes[f"{g.fold}.weight"])
            a, s, ratio, screen, skipped = screened_search(
                weights, stats[(g.layer, g.kind)], g, option, cfg, restrict
            )
            for w in weights:
                w.mul_(s)
            _fold(modules[g.fold], s, g, dtypes.get(f"{g.fold}.weight"))
            record = {"layer": g.layer, "group": g.kind, "exponent": round(a, 4),
                      "error_ratio": float(f"{ratio:.6g}"), "fold": g.fold}  # fmt: skip
            if cfg.screen_rows:  # the screen's estimate, and whether the group was left unscaled by the rule
                record["screen_ratio"] = float(f"{screen:.6g}")
                record["skipped"] = skipped
            if g.fold_kind == "offset":  # channels a (1 + w) norm could not take exactly stay unscaled
                record["fold_kind"] = "offset"
                record["unscaled_channels"] = int((s == 1).sum())
            records.append(record)
    return records


def search_rows(w: Any, cap: int, seed: int, g: Group, j: int) -> Any:
    """`w` in float32, or a seeded sample of `cap` of its rows (in order) when it has more: the search's cost
    is linear in rows, and on an 8B model's 14,336-row projections every row is 3.5x the work of 4,096."""
    import torch

    if not cap or w.shape[0] <= cap:
        return w.float()
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}.{g.layer}.{g.kind}.{j}".encode()))
    pick = torch.randperm(w.shape[0], generator=gen)[:cap].sort().values
    return w[pick].float()


def _fold(module: Any, s: Any, g: Group, dtype: Any = None) -> None:
    """Divide the producer of the group's input by s: a norm's weight ((1 + w) norms through `offset_weight`),
    or a linear's rows (its row range for a fused projection, and the bias)."""
    if g.share > 1:  # one scale per kv-head channel: the first head of each share-group carries it
        s = s.reshape(-1, g.share, g.head_dim)[:, 0, :].reshape(-1)
    if g.fold_kind == "offset":
        new, ok = offset_weight(module.weight.detach(), s, dtype)
        if not bool(ok.all()):
            raise MintError(f"equalize: {g.fold} cannot take these scales exactly")  # restrict() prevents it
        module.weight.copy_(new)
        return
    if module.weight.ndim == 1:
        module.weight.div_(s)
        return
    start, stop = g.rows or (0, module.weight.shape[0])
    module.weight[start:stop].div_(s[:, None])
    if getattr(module, "bias", None) is not None:
        module.bias[start:stop].div_(s)


class NothingToEqualize(Exception):
    """No pair of the model can be equalized exactly: the stage builds it unequalized."""

    def __init__(self, skipped: list[dict[str, Any]]) -> None:
        super().__init__("nothing to equalize")
        self.skipped = skipped


def compute(model_dir: Path, corpus_dir: Path, cfg: EqualizeConfig, weights: Path, progress: bool) -> dict:
    """Write `weights` (every checkpoint tensor in its stored dtype, the rewritten ones replaced) one decoder
    block at a time; return the equalize.json record. Raises NothingToEqualize when no pair can be equalized.

    Block l: every window's hidden state goes through the block as read (the statistics are the original
    model's, as a whole-model pass would see them; the outputs carry on to block l + 1), then the block's
    groups are searched and folded in fp32, and its rewritten tensors are written. Memory: one block in fp32,
    the windows' hidden states and one block's statistics (the embedding and head only until the windows have
    entered block 0)."""
    import numpy as np
    import torch

    from mintbuild.hf.checkpoint import fingerprint
    from mintbuild.hf.streaming import check_fits

    ckpt, windows, train_sha = calibration_windows(model_dir, corpus_dir, cfg.n_windows, cfg.window, cfg.seed)
    with torch_settings(cfg.threads):
        model = _streamed(model_dir)
        # refused before any block is read when one block plus the windows' hidden states (into and out of
        # a block) and the search sample cannot fit
        tokens = sum(len(w.ids) for w in windows)
        acts = (2 * tokens + cfg.samples) * model.config.hidden_size * 4
        check_fits(model, acts, "equalize")
        with StreamedSafetensors(weights, _specs(ckpt), {"format": "pt"}) as out:
            records, skipped = _stream_blocks(model, ckpt, windows, cfg, out, progress)
            del model
            gc.collect()
            for name in ckpt.names:  # everything no group rewrote, as stored
                if name not in out.written:
                    out.write(name, ckpt.read(name))
    ratios = [r["error_ratio"] for r in records]
    record = {
        "schema_version": SCHEMA_VERSION,
        "method": _method(cfg),
        "provenance": {
            "model_fingerprint": fingerprint(ckpt),
            "corpus_split": "train",
            "corpus_train_sha256": train_sha,
            "tokens": sum(len(w.ids) for w in windows),
            "search_option": f"q{cfg.bits}g{cfg.group}",
            "grid": cfg.grid,
            "samples": cfg.samples,
            "search_rows": cfg.search_rows,
            "screen_rows": cfg.screen_rows,
            "skip_below": cfg.skip_below,
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
            "skipped_by_screen": sum(bool(r.get("skipped")) for r in records),
        },
        "groups": records,
    }
    if skipped:  # absent when every pair was equalized, so a Llama's record is as before
        record["skipped"] = skipped
    return record


def _method(cfg: EqualizeConfig) -> str:
    """equalize.json's one-line statement of the search that chose the exponents."""
    method = "awq: per group s = mean|x|^a, a searched on a grid of [0, 1], powers of two (exact rewrite)"
    if not cfg.screen_rows:
        return method
    return (
        f"{method}; screened: every a on {cfg.screen_rows} rows per linear, then a walk from the best to a local "
        f"minimum on the search rows; a group the screen gains less than {cfg.skip_below:g} of its error keeps "
        "s = 1"
    )


def _streamed(model_dir: Path) -> Any:
    """The layer-streamed fp32 model; a model whose blocks are not `model.layers` has nothing to equalize."""
    import torch

    from mintbuild.hf.streaming import CheckpointSource, NoDecoderBlocks, StreamedModel

    try:
        # no head: the blocks' statistics need only the embedding (an untied 8B's head is 2.1 GB in fp32)
        model = StreamedModel(CheckpointSource(model_dir), torch.float32, head=False)
    except NoDecoderBlocks as e:  # other errors (weights that do not fit the architecture) stay errors
        raise NothingToEqualize([{"layer": None, "pair": "all", "reason": str(e)}]) from None
    if model.prefix != "model.layers":
        reason = f"{type(model.model).__name__} has no model.layers"
        raise NothingToEqualize([{"layer": None, "pair": "all", "reason": reason}])
    return model


def _stream_blocks(
    model: Any, ckpt: Any, windows: list[Any], cfg: EqualizeConfig, out: StreamedSafetensors, progress: bool
) -> tuple[list[dict], list[dict]]:
    """(group records, skipped pairs) of every block, in block order; writes each block's rewritten tensors."""
    import torch

    from mintbuild.progress import track

    dtypes = {n: dtype_of(ckpt, n) for n in ckpt.tensors}
    n_tokens = sum(len(w.ids) for w in windows)
    step = max(1, math.ceil(n_tokens / cfg.samples))  # every step-th token goes to the search sample
    with torch.no_grad():
        entered = [model.enter(torch.tensor(w.ids, dtype=torch.long)[None]) for w in windows]
    hidden, calls = [h for h, _ in entered], [c for _, c in entered]
    model.drop_outer()  # the block pass needs no embedding or head
    records: list[dict] = []
    skipped: list[dict] = []
    seconds = [0.0, 0.0]
    cpu = 0.0  # CPU seconds of the search (all threads): on a shared machine, wall time says little
    for i in track(range(model.n_blocks), "equalize: blocks", "block", progress):
        with model.block(i) as blk:
            modules = {f"{model.prefix}.{i}.{n}".rstrip("."): m for n, m in blk.named_modules()}
            groups, skip = block_groups(i, blk, model.config)
            skipped += skip
            t0 = time.perf_counter()
            stats, hidden = block_stats(blk, modules, groups, hidden, [c[i] for c in calls], step, n_tokens)
            t1, c1 = time.perf_counter(), time.process_time()
            records += equalize_groups(modules, groups, stats, cfg, dtypes)
            seconds[0], seconds[1] = seconds[0] + t1 - t0, seconds[1] + time.perf_counter() - t1
            cpu += time.process_time() - c1
            for name, t in rewritten_tensors(dict(blk.named_parameters(prefix=f"{model.prefix}.{i}")),
                                             groups, ckpt).items():  # fmt: skip
                out.write(name, t)
    if skipped:
        log.info("equalize: %d pair(s) not equalized, e.g. layer %s %s: %s", len(skipped),
                 skipped[0]["layer"], skipped[0]["pair"], skipped[0]["reason"])  # fmt: skip
    if not records:
        raise NothingToEqualize(skipped)
    log.info("calibration %.1f s, search %.1f s (%.1f CPU s; %d groups x %d exponents, %d left unscaled by the "
             "screen, %d blocks streamed)", seconds[0], seconds[1], cpu, len(records), cfg.grid,
             sum(bool(r.get("skipped")) for r in records), model.n_blocks)  # fmt: skip
    return records, skipped


def rewritten_tensors(params: dict[str, Any], groups: list[Group], ckpt: Any) -> dict[str, Any]:
    """The checkpoint tensors the groups rewrote, from `params` (name -> parameter) in their stored dtype,
    checked exact."""
    touched: set[str] = set()
    for g in groups:
        touched.update(f"{n}.weight" for n in g.linears)
        touched.update({f"{g.fold}.weight", f"{g.fold}.bias"})
    missing = sorted(n for n in touched if n.endswith(".weight") and n not in ckpt.tensors)
    if missing:
        raise MintError(f"equalize: the checkpoint has no tensor {missing[0]} (the model names it)")
    out = {}
    for name in sorted(touched & set(params) & set(ckpt.tensors)):
        new = params[name].detach()
        cast = new.to(dtype_of(ckpt, name))
        # Power-of-two scales are exact unless a value leaves the dtype's range: refuse rather than round.
        if not bool((cast.float() == new.float()).all()) or not bool(cast.isfinite().all()):
            raise MintError(f"equalize: {name} is not exactly representable in {cast.dtype} after scaling")
        out[name] = cast.contiguous()
    return out


def dtype_of(ckpt: Any, name: str) -> Any:
    """The torch dtype a checkpoint tensor is stored in."""
    import torch

    from mintbuild.hf.checkpoint import FLOAT_DTYPES

    return getattr(torch, FLOAT_DTYPES[ckpt.tensors[name].dtype][2])


def _specs(ckpt: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} of every checkpoint tensor: the output holds the same tensors."""
    return {n: (t.dtype, tuple(t.shape)) for n, t in ckpt.tensors.items()}
