"""Numerics whose result does not depend on the thread count: what the calibration stages and GPTQ use for every
value that steers a discrete choice (an equalization exponent, a knapsack cost, a GPTQ code).

Measured on torch's CPU build (MKL): float32 and float64 matmuls and same-dtype reductions give identical bits
with 1 and 2 threads, but a float32 tensor reduced with ``dtype=torch.float64`` and LAPACK (Cholesky, SVD,
eigh) do not. So: sums that must be exact to the last bit are taken by numpy in float64 (one thread, a fixed
pairwise order), and LAPACK calls run on a fixed number of torch threads (one, or GPTQ's factor's two).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch (and MKL under it) on exactly `n` threads, whatever the machine's cores, then restore the thread
    count. MKL gives the same bits for the same thread count (its conditional numerical reproducibility, with the
    code path and MKL_DYNAMIC pinned: dispatch.py), so a LAPACK call made here is the same on every machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def one_torch_thread() -> contextlib.AbstractContextManager[None]:
    """Run torch (and MKL's LAPACK under it) on one thread, then restore the thread count."""
    return torch_threads(1)


def _float64(t: Any) -> np.ndarray:
    """A float64 numpy view or copy of a torch tensor or array."""
    if hasattr(t, "detach"):
        import torch

        return t.detach().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def sum64(t: Any, axis: int | None = None) -> Any:
    """The float64 sum of a tensor (all elements, or along `axis`) in numpy's fixed order: a float for a full
    sum, else a float64 torch tensor."""
    s = _float64(t).sum(axis=axis)
    if axis is None:
        return float(s)
    import torch

    return torch.from_numpy(np.ascontiguousarray(s))


def sum_squares64(t: Any, axis: int | None = None) -> Any:
    """sum64 of t^2, squared in float64."""
    return sum64(np.square(_float64(t)), axis)
