"""Error-compensated rounding (GPTQ) into MLX's affine format, for tensors with a measured input Hessian.

Round-to-nearest minimises each weight's own error. What the model feels is the layer's output error,
||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X summed over calibration tokens. GPTQ (Frantar et
al., 2023) rounds the K input columns of W one at a time and moves each column's rounding error onto the columns
not rounded yet, along the upper Cholesky factor U of H^-1, so the output error shrinks. The stored format is
unchanged, exactly MLX's: codes, and a bf16 scale and bias per group of g consecutive inputs, derived as
`mx.quantize` derives them (quant/reference.py) from the group's current values when its first column is reached. With a
diagonal H nothing moves and the result is bit-identical to `quant.reference.quantize_codes` (tests/test_gptq.py).

Which tensors get it is decided by the importance stage, which measures H only for the output head (the tied
embedding of the embedded SmolLM2): measured on it at uniform q4g64, GPTQ of the head took the equalized
model from PPL 23.55 to 22.58 (4 test windows; 30.44 -> 28.61 on 16), while GPTQ of every linear layer as well
gained only 0.02 more for ~1 min per target (see the README's "Rounding").
"""

from __future__ import annotations

import torch

from .errors import MintError
from .formats import Option
from .quant.reference import _group_params, dequantize_codes, quantize_dequantize

#: Recorded in the packer's cache key and manifest; bump whenever the numbers below change.
GPTQ_VERSION = "gptq-mlx-affine/1"


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float32 (computed in float64).

    The damping keeps H invertible when calibration tokens are fewer than inputs or an input is always zero;
    larger values move the result toward round-to-nearest.
    """
    h = hessian.to(torch.float64).clone()
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise MintError(f"Hessian of shape {list(h.shape)} is not square")
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # an input that never fired: nothing to compensate through it
    diag += damp * float(diag.mean())
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()
    except RuntimeError as e:  # torch raises _LinAlgError (a RuntimeError) for a non-positive-definite H
        raise MintError(f"Hessian is not positive definite even with damp {damp}: {e}") from None


def gptq_codes(
    w: torch.Tensor, hessian: torch.Tensor, option: Option, damp: float, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes [R, K], bf16 scales [R, K/g], bf16 biases [R, K/g]) of a 2-D `w` rounded by GPTQ.

    `w` is first rounded to bf16, as the packer stores it; the arithmetic of one group (scale, bias, codes, the
    dequantized value in bf16) is quant/reference.py's. `block` columns are updated at a time (rounded to a multiple of g).
    """
    bits, g = option.bits, option.group
    if w.ndim != 2:
        raise MintError(f"GPTQ rounds 2-D weights; got shape {list(w.shape)}")
    rows, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise MintError(f"Hessian of shape {list(hessian.shape)} does not match {k} input columns")
    u = inverse_cholesky(hessian, damp)
    work = w.to(torch.bfloat16).float()
    max_q = (1 << bits) - 1
    codes = torch.empty((rows, k), dtype=torch.uint8)
    scales = torch.empty((rows, k // g), dtype=torch.float32)
    biases = torch.empty((rows, k // g), dtype=torch.float32)
    block = max(block // g, 1) * g  # groups never straddle blocks
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, ub = work[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for j in range(b1 - b0):
            if j % g == 0:
                scale, bias = _group_params(wb[:, j : j + g], bits)
                scales[:, (b0 + j) // g], biases[:, (b0 + j) // g] = scale, bias
                s16, b16 = scale.to(torch.bfloat16).float(), bias.to(torch.bfloat16).float()
            q = torch.round((wb[:, j] - bias) / scale).clamp_(0, max_q)
            deq = ((q * s16).to(torch.bfloat16).float() + b16).to(torch.bfloat16).float()
            codes[:, b0 + j] = q.to(torch.uint8)
            err[:, j] = (wb[:, j] - deq) / ub[j, j]
            wb[:, j + 1 :] -= err[:, j : j + 1] * ub[j, j + 1 :]
        work[:, b1:] -= err @ u[b0:b1, b1:]
    return codes, scales.to(torch.bfloat16), biases.to(torch.bfloat16)


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared output error over the tokens H was summed from."""
    e = w.double() - deq.double()
    return float(((e @ hessian.double()) * e).sum())


def rounding_gain(
    w: torch.Tensor,
    fit: torch.Tensor,
    held_out: torch.Tensor,
    options: list[Option],
    damp: float,
    block: int,
    rows: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Per option, the output error of GPTQ fitted on the Hessian `fit`, over round-to-nearest's, both measured
    on `held_out` (the Hessian of other tokens): below 1 when GPTQ helps on text it did not see.

    GPTQ rounds each row against the same H independently of the other rows, so the ratio is estimated on a
    seeded sample of `rows` rows (1,024 of the 49,152 of SmolLM2's head: ~0.1 s per option). The allocator
    multiplies the tensor's fisher cost by it, so that it prices the tensor as the packer will store it.
    """
    if w.shape[0] > rows:
        pick = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
        w = w[pick.sort().values]
    h = held_out.double()
    gains = {}
    for opt in options:
        q, s, b = gptq_codes(w, fit, opt, damp, block)
        rtn = output_error(w, quantize_dequantize(w, opt), h)
        gains[opt.name] = output_error(w, dequantize_codes(q, s, b, opt.group), h) / rtn if rtn > 0 else 1.0
    return gains
