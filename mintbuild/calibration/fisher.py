"""Learned importance (alpha) per tensor from a short calibration pass: the diagonal empirical Fisher, llama.cpp's
importance matrix from the same windows.

For each calibration window w (``window`` tokens of the corpus *train* split, never the test split that
`mintbuild evaluate` scores) we compute the mean next-token cross-entropy L_w of the fp32 model, backpropagate,
and take per weight tensor i the mean over its elements of grad^2. The model is never whole in memory: the
forward and backward passes stream one decoder block at a time (mintbuild.hf.streaming; `fisher_pass`), so peak
memory is one fp32 block with its gradients, the non-block parameters, and every block boundary's hidden
states of the windows. Then

    alpha_i = (1/n_windows) * sum_w mean_elements(dL_w/dW_i ^ 2)

which is the per-tensor mean of the diagonal empirical Fisher. A quantization error E_i on tensor i raises the
expected loss by about 1/2 * sum_j F_jj E_j^2 ~ 1/2 * alpha_i * SSE_i, so the allocator's `fisher` objective is
cost_i(option) = pi_i * alpha_i * SSE_i(option), with SSE from the (data-free) profile.

Windows: start at a line beginning of train.txt, chosen with a seeded permutation, non-overlapping; each is the
first ``window`` tokens of the text from there. Their character ranges in train.txt are recorded so anyone can
check that calibration never touched the evaluation text.

Tied embedding / lm_head: the tied parameter's gradient already sums both uses; it is recorded under the
checkpoint name of the embedding. Stacked MoE experts (one 3-D tensor) get one alpha. Experts stored one tensor
per expert get an empirical-Bayes estimate: each expert's mean is shrunk toward the mean of its siblings
(same layer and projection) in proportion to its between-window variance, so an expert that saw few tokens
(noisy, spiky gradients) borrows strength from the others, and one that saw none gets the siblings' mean.
Checkpoint tensors the loaded model does not expose under the same name get the mean of their role in the same
layer (else of the role, else of all tensors) and are listed under "estimated".

On the same windows, every linear layer's inputs give llama.cpp's importance matrix (the per-input-channel sum
of x^2 and the token count; imatrix.safetensors by checkpoint name, its sha256 in importance.json), which
`mintbuild profile --format gguf` writes as llama.cpp's imatrix file for its errors and llama-quantize.

Values are rounded to `sig_digits` significant digits: on one machine and thread count the gradients are
bitwise reproducible, but the matmul split (threads, CPU) changes the last bits, and 6 digits is far below
the sampling noise of a 2k-token Fisher estimate.

One job: what the calibration text says about each tensor's sensitivity (alpha and the imatrix sums).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mintbuild import __version__
from mintbuild.artifacts.importance import IMATRIX_FILE, SCHEMA_VERSION
from mintbuild.calibration.windows import (
    SPLIT,
    Window,
    calibration_windows,
    round_sig,
    torch_settings,
)
from mintbuild.config import ImportanceConfig
from mintbuild.hf.checkpoint import tied_lm_head
from mintbuild.hf.names import expert_group
from mintbuild.hf.streaming import CheckpointSource, StreamedModel, check_fits, forward_hidden, run_block
from mintbuild.reproducible import sum_squares64

log = logging.getLogger(__name__)


def _g2(p: Any, chunk: int = 1 << 22) -> float:
    """mean(grad^2) of a parameter, accumulated in float64 (the mean of ~10^8 squares in fp32 would lose
    digits) a chunk of elements at a time: a float64 copy of a whole embedding's gradient would be 2x its
    float32 size, twice over."""
    if p.grad is None:
        return 0.0
    # a sparse gradient (an untied embedding's, through the input): its rows, summed once each
    flat = (p.grad.coalesce().values() if p.grad.is_sparse else p.grad).reshape(-1)
    total = math.fsum(sum_squares64(c) for c in flat.split(chunk))
    return total / max(p.numel(), 1)


class SquareSums:
    """llama.cpp's importance matrix, measured on the calibration windows: per linear layer (every nn.Linear
    of the decoder blocks, and the output head) the per-input-channel sum over tokens of x^2 (float64) and the
    number of tokens it saw, by the checkpoint name of the layer's weight."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: Any) -> None:
        import torch

        x = x.detach().reshape(-1, x.shape[-1])
        sq = torch.sum(x.double().square(), dim=0)
        if name in self.sums:
            self.sums[name] += sq
        else:
            self.sums[name] = sq
        self.counts[name] = self.counts.get(name, 0) + int(x.shape[0])

    @contextlib.contextmanager
    def hooked(self, block: Any, prefix: str) -> Iterator[None]:
        """Record the inputs of every nn.Linear inside `block` (named `prefix` + its path + `.weight`)."""
        import torch

        handles = []
        for path, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                name = f"{prefix}.{path}.weight"
                handles.append(mod.register_forward_pre_hook(lambda _m, inp, n=name: self.add(n, inp[0])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def fisher_pass(
    model: StreamedModel, windows: list[Window], progress: bool, squares: SquareSums | None = None
) -> tuple[dict[str, list[float]], list[float]]:
    """Per parameter, the per-window mean of grad^2 (float64); and the per-window loss. With `squares`, the
    inputs of every linear layer are recorded into it on the way (each block's forward is run once per window
    in the backward walk, the head's once per window in the outer pass).

    Layer-streamed: the windows go forward block by block, keeping each block's input; the head gives
    dLoss/dhidden at the top; then the blocks are walked from the top down, each block's forward recomputed from
    its saved input and backpropagated with the gradient carried from above (activation checkpointing with
    offloaded blocks); the embedding's gradient (with the head's, when they are tied) is taken last. Each
    window's gradient of every parameter is exactly the whole model's (up to float summation order).
    """
    import torch

    from mintbuild.progress import track

    t0 = time.perf_counter()
    ids = [torch.tensor(w.ids, dtype=torch.long)[None] for w in windows]
    length, hidden_size = max(len(w.ids) for w in windows), model.config.hidden_size
    # every block boundary's hidden states of every window (fp32), and one window's logits and their gradient
    acts = (model.n_blocks + 2) * len(
        ids
    ) * length * hidden_size * 4 + 3 * length * model.config.vocab_size * 4
    check_fits(model, acts, "importance", grad_factor=2)
    saved: list[list[Any]] = []
    top, calls = forward_hidden(
        model, [w.ids for w in windows], progress, "importance: forward",
        keep=lambda _i, h: saved.append(h),
    )  # fmt: skip

    def head_loss(i: int, h: Any) -> Any:
        return model.head(ids[i], h, labels=ids[i]).loss

    # dLoss/dhidden at the top (the head's own parameters' gradients are taken with the embedding's, below).
    # No reference to the outer parameters is kept here: the walk down frees them (drop_outer).
    for _name, param in model.outer_parameters():
        param.requires_grad_(False)
    del param
    grads, losses = [], []
    for i, h in enumerate(top):
        x = h.detach().requires_grad_(True)
        loss = head_loss(i, x)
        loss.backward()
        grads.append(x.grad)
        losses.append(float(loss.detach()))
    per_window: dict[str, list[float]] = defaultdict(list)
    model.drop_outer()  # the walk down needs no embedding or head; the outer pass reads them again
    for b in track(reversed(range(model.n_blocks)), "importance: backward", "block", progress,
                   total=model.n_blocks):  # fmt: skip
        _block_backward(model, b, saved.pop(), [c[b] for c in calls], grads, per_window, squares)
    model.reload_outer()
    log.info("importance: the embedding's and the head's gradients, %d windows", len(ids))
    _outer_pass(model, ids, top, grads, per_window, squares)
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(w.ids) for w in windows)
    log.info(
        "calibration: %d windows x %d tokens, %d blocks streamed, in %.1f s (%.0f tokens/s), mean loss %.4f",
        len(windows), length, model.n_blocks, seconds, n_tokens / max(seconds, 1e-9), float(np.mean(losses)),
    )  # fmt: skip
    return dict(per_window), losses


def _block_backward(
    model: StreamedModel,
    b: int,
    inputs: list[Any],
    calls: list[Any],
    grads: list[Any],
    per_window: dict[str, list[float]],
    squares: SquareSums | None,
) -> None:
    """Block b's forward recomputed from its saved inputs and backpropagated with `grads` (dLoss/d its output,
    replaced by dLoss/d its input), each parameter's mean(grad^2) appended per window. A function of its own so
    that nothing holding the block's parameters or gradients (the graph's leaves, the parameter list) outlives
    it: kept in the caller's scope, they held two blocks with gradients at once (1.7 GB more on an 8B)."""
    with model.block(b) as blk, (squares or _NO_SQUARES).hooked(blk, f"{model.prefix}.{b}"):
        named = list(blk.named_parameters())
        for i, h in enumerate(inputs):
            blk.zero_grad(set_to_none=True)
            x = h.detach().requires_grad_(True)
            out = run_block(blk, x, calls[i])
            out.backward(grads[i])
            grads[i] = x.grad
            for n, p in named:
                per_window[f"{model.prefix}.{b}.{n}"].append(_g2(p))
        del named, out, p  # before the block's exit releases its memory to the OS
        blk.zero_grad(set_to_none=True)


class _NoSquares(SquareSums):
    @contextlib.contextmanager
    def hooked(self, block: Any, prefix: str) -> Iterator[None]:
        yield


_NO_SQUARES = _NoSquares()


def _outer_pass(
    model: StreamedModel,
    ids: list[Any],
    top: list[Any],
    grads: list[Any],
    per_window: dict[str, list[float]],
    squares: SquareSums | None = None,
) -> None:
    """Per window, mean(grad^2) of the parameters outside the blocks: the head's and the final norm's through
    the loss, the embedding's through the first block's input (`grads`: dLoss/d that input), summed as one
    backward pass would. The head's weight gradient (vocab x hidden, an embedding's size) is never whole in
    memory: `_head_g2` forms it a row block at a time; the embedding's gradient through the input is a few
    rows, taken sparse."""
    import torch

    head = model.model.get_output_embeddings()
    emb = model.model.get_input_embeddings()
    outer = model.outer_parameters()
    for _, p in outer:
        p.requires_grad_(True)
    sparse = getattr(emb, "sparse", None)
    if isinstance(emb, torch.nn.Embedding):
        emb.sparse = True
    try:
        for i, h in enumerate(top):
            model.model.zero_grad(set_to_none=True)
            x, dy = _head_backward(model, head, ids[i], h)
            h0, _ = model.enter(ids[i])
            if h0.requires_grad:
                h0.backward(grads[i])
            for n, p in outer:
                if p is head.weight:  # its .grad holds only the embedding's sparse rows (tied), if any
                    per_window[n].append(_head_g2(x, dy, p.grad))
                    if squares is not None and isinstance(head, torch.nn.Linear):
                        squares.add(n, x)
                else:
                    per_window[n].append(_g2(p))
    finally:
        if sparse is not None:
            emb.sparse = sparse
    model.model.zero_grad(set_to_none=True)


def _head_backward(model: StreamedModel, head: Any, ids: Any, hidden: Any) -> tuple[Any, Any]:
    """Backward through the model's own head (final norm, head, soft-capping, loss) with the head's output cut
    from its weight: every parameter before the head gets its gradient, the head's weight none. Returns the
    head's input x [T, hidden] and dLoss/d(its output) dy [T, vocab], from which its weight's gradient is
    dy^T x."""
    seen: dict[str, Any] = {}

    def cut(_m: Any, inputs: tuple[Any, ...], out: Any) -> Any:
        seen["x"], seen["y"] = inputs[0], out.detach().requires_grad_(True)
        return seen["y"]

    handle = head.register_forward_hook(cut)
    try:
        loss = model.head(ids, hidden.detach(), labels=ids).loss
    finally:
        handle.remove()
    loss.backward()
    x, dy = seen["x"], seen["y"].grad
    if x.requires_grad:  # the final norm's gradient: dLoss/dx as the head's own backward would pass it down
        x.backward(dy @ head.weight.detach())
    if getattr(head, "bias", None) is not None:
        head.bias.grad = dy.reshape(-1, dy.shape[-1]).sum(0)
    return x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])


def _head_g2(x: Any, dy: Any, extra: Any, chunk: int = 1 << 22) -> float:
    """mean(grad^2) of the head's weight, whose gradient is dy^T x (+ `extra`, the tied embedding's sparse
    gradient, added as autograd accumulates it), formed a block of vocabulary rows at a time. The blocks hold a
    whole number of `_g2`'s chunks (when that costs at most 16 chunks), so the chunk sums, and the result, are
    the ones `_g2` takes of the whole gradient."""
    import torch

    vocab, hidden = dy.shape[1], x.shape[1]
    rows = math.lcm(chunk, hidden) // hidden
    if rows * hidden > 16 * chunk:  # few factors of two in `hidden`: equal to float rounding instead
        rows = max(1, chunk // hidden)
    if extra is not None:
        extra = extra if extra.is_sparse else extra.to_sparse()
        index, values = extra._indices()[0], extra._values()
    sums = []
    for r0 in range(0, vocab, rows):
        r1 = min(vocab, r0 + rows)
        # as autograd's mm backward: (x^T dy) then transposed, made contiguous like a .grad
        g = x.T.mm(dy[:, r0:r1]).T.contiguous()
        if extra is not None:
            keep = (index >= r0) & (index < r1)
            g.add_(
                torch.sparse_coo_tensor(
                    (index[keep] - r0)[None], values[keep], g.shape, check_invariants=True
                )
            )
        sums += [sum_squares64(c) for c in g.reshape(-1).split(chunk)]
    return math.fsum(sums) / max(vocab * hidden, 1)


def calibrate(
    model_dir: Path,
    windows: list[Window],
    cfg: ImportanceConfig,
    progress: bool,
    squares: SquareSums | None = None,
) -> tuple[dict[str, list[float]], list[float]]:
    """Run the layer-streamed Fisher pass in fp32 (recording linear inputs into `squares`); torch's global
    settings are restored afterwards."""
    import torch

    with torch_settings(cfg.threads, cfg.seed):
        model = StreamedModel(CheckpointSource(model_dir), torch.float32, grad=True)
        log.info("streaming %s in fp32 (%d blocks, %d threads)", model_dir, model.n_blocks,
                 torch.get_num_threads())  # fmt: skip
        return fisher_pass(model, windows, progress, squares)


def shrink_experts(
    means: dict[str, float], per_window: dict[str, list[float]], roles: dict[str, str]
) -> None:
    """Empirical-Bayes shrinkage of per-expert tensors toward their siblings' mean (in place).

    Sibling group: same name once the expert index is replaced. Expert e with mean m_e and squared standard
    error v_e (between-window variance / n) gets B_e*mu + (1-B_e)*m_e, with tau^2 = var(m) - mean(v) the
    spread of true alphas across experts and B_e = v_e / (v_e + tau^2). Experts with zero gradient (no token
    routed to them) take mu, the mean over experts that saw tokens.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for name in means:
        if roles.get(name) == "moe_expert":
            groups[expert_group(name)].append(name)
    for members in groups.values():
        seen = [n for n in members if means[n] > 0]
        if not seen:
            continue
        m = np.array([means[n] for n in seen])
        v = np.array(
            [
                np.var(per_window[n], ddof=1) / len(per_window[n]) if len(per_window[n]) > 1 else 0.0
                for n in seen
            ]
        )
        mu = float(m.mean())
        tau2 = max(float(m.var()) - float(v.mean()), 0.0)
        for n, mi, vi in zip(seen, m, v, strict=True):
            b = 1.0 if tau2 == 0 and vi > 0 else (vi / (vi + tau2) if vi + tau2 > 0 else 0.0)
            means[n] = b * mu + (1 - b) * float(mi)
        for n in members:
            if means[n] == 0:
                means[n] = mu


def fill_missing(
    names: list[str], alpha: dict[str, float], roles: dict[str, str], layers: dict[str, int]
) -> dict[str, str]:
    """Estimate alpha for checkpoint tensors the model does not expose by name; returns name -> how."""
    by_role_layer: dict[tuple[str, int], list[float]] = defaultdict(list)
    by_role: dict[str, list[float]] = defaultdict(list)
    for n, a in alpha.items():
        role = roles[n].rstrip("s")  # moe_experts (stacked) and moe_expert (split) are one family
        by_role_layer[role, layers[n]].append(a)
        by_role[role].append(a)
    overall = [a for a in alpha.values()]
    estimated = {}
    for n in names:
        if n in alpha:
            continue
        role = roles[n].rstrip("s")
        for key, pool in (
            (f"mean of role {role} in layer {layers[n]}", by_role_layer.get((role, layers[n]))),
            (f"mean of role {role}", by_role.get(role)),
            ("mean of all tensors", overall),
        ):
            if pool:
                alpha[n], estimated[n] = float(np.mean(pool)), key
                break
    return estimated


def compute_importance(
    model_dir: Path,
    corpus_dir: Path,
    cfg: ImportanceConfig,
    progress: bool = True,
    squares: SquareSums | None = None,
) -> dict[str, Any]:
    """The importance artifact (a JSON-able dict) of the model in `model_dir` on `corpus_dir`/train.txt;
    the linear layers' input squares of the same windows go into `squares` when given."""
    import torch
    import transformers

    from mintbuild.hf.checkpoint import compile_rules, fingerprint, layer_index, tensor_role

    model_dir, corpus_dir = Path(model_dir), Path(corpus_dir)
    ckpt, windows, train_sha = calibration_windows(model_dir, corpus_dir, cfg.n_windows, cfg.window, cfg.seed)

    per_window, losses = calibrate(model_dir, windows, cfg, progress, squares)

    skip = tied_lm_head(ckpt)
    names = [n for n in ckpt.names if n != skip]
    rules = compile_rules()
    roles = {n: tensor_role(n, len(ckpt.tensors[n].shape), rules) for n in names}
    layers = {n: layer_index(n) for n in names}
    unused = sorted(set(per_window) - set(names))
    if unused:
        log.warning(
            "%d model parameters are not in the checkpoint by name (ignored): %s", len(unused), unused[:3]
        )
    means = {n: float(np.mean(per_window[n])) for n in names if n in per_window}
    shrink_experts(means, per_window, roles)
    estimated = fill_missing(names, means, roles, layers)
    if estimated:
        log.warning(
            "%d checkpoint tensors had no gradient by name; alpha estimated: %s",
            len(estimated),
            list(estimated)[:3],
        )
    alpha = {n: round_sig(means[n], cfg.sig_digits) for n in names}
    return {
        "schema_version": SCHEMA_VERSION,
        "method": "diagonal empirical Fisher, per-tensor mean: alpha = mean_elements(sum_w grad_w^2) / n_windows",
        "provenance": {
            "model_fingerprint": fingerprint(ckpt),
            "corpus_split": SPLIT,
            "corpus_train_sha256": train_sha,
            "tokens": sum(len(w.ids) for w in windows),
            "windows": len(windows),
            "window": len(windows[0].ids),
            "seed": cfg.seed,
            "sig_digits": cfg.sig_digits,
            "mintbuild_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        },
        "windows": [
            {
                "char_start": w.char_start,
                "char_end": w.char_end,
                "tokens": len(w.ids),
                "loss": round_sig(loss, 6),
            }
            for w, loss in zip(windows, losses, strict=True)
        ],
        "tied": _tied(ckpt.config, roles),
        "alpha": alpha,
        "estimated": estimated,
        "summary": summarise(alpha, roles),
    }


def _tied(config: dict[str, Any], roles: dict[str, str]) -> dict[str, str]:
    """{lm_head: the embedding name its alpha is recorded under}, for a tied model (whether or not the
    checkpoint stores the lm_head copy)."""
    emb = [n for n, r in roles.items() if r == "embedding"]
    return {"lm_head.weight": emb[0]} if config.get("tie_word_embeddings") and emb else {}


def summarise(alpha: dict[str, float], roles: dict[str, str]) -> dict[str, dict[str, Any]]:
    by_role: dict[str, list[float]] = defaultdict(list)
    for n, a in alpha.items():
        by_role[roles[n]].append(a)
    return {
        r: {"tensors": len(v), "mean": round_sig(float(np.mean(v)), 6), "min": min(v), "max": max(v)}
        for r, v in sorted(by_role.items())
    }


def imatrix_arrays(
    squares: SquareSums, names: list[str], sig_digits: int, window: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({checkpoint weight name: sum over tokens of x^2 per input channel, float64}, the record for
    importance.json: tokens per tensor, the chunk size). Only checkpoint tensors are kept; values are rounded
    to `sig_digits` significant digits like the alphas (the last bits depend on the matmul's thread split)."""
    import torch

    known = set(names)
    dropped = sorted(set(squares.sums) - known)
    if dropped:
        log.warning(
            "%d linear layers are not checkpoint tensors (no imatrix entry): %s", len(dropped), dropped[:3]
        )
    arrays = {n: _round_array(squares.sums[n], sig_digits) for n in sorted(squares.sums) if n in known}
    record = {
        "file": IMATRIX_FILE,
        "what": "per linear layer: sum over calibration tokens of x^2 per input channel (float64), llama.cpp's "
        "importance matrix (in_sum2); counts = tokens seen",
        "counts": {n: squares.counts[n] for n in arrays},
        "chunk_size": window,
        "torch_version": torch.__version__,
    }
    return arrays, record


def _round_array(x: Any, digits: int) -> Any:
    """float64 `x` rounded to `digits` significant digits (zeros stay zero)."""
    import torch

    a = x.abs()
    exp = torch.floor(torch.log10(torch.where(a > 0, a, torch.ones_like(a))))
    scale = torch.pow(torch.tensor(10.0, dtype=torch.float64), digits - 1 - exp)
    return torch.where(a > 0, torch.round(x * scale) / scale, torch.zeros_like(x))
