"""A square float32 Hessian in a raw file (C order, little-endian; what calibration/hessians.py's HessianStore
spills), read a few rows at a time: GPTQ's factor and clip search take it in place of a tensor, so that a wide
layer's H (28,672^2 x 4 B = 3.3 GB for a 70B's down_proj) need not be in memory beside the factor's buffer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class HessianFile:
    """H [K, K] float32 in `path`; `h[rows]` (a slice or an index tensor) reads those rows, `diagonal()` the
    diagonal in float64; nothing is kept in memory between reads."""

    def __init__(self, path: Path, k: int) -> None:
        self.path, self.k = Path(path), k
        self.shape = (k, k)
        size = self.path.stat().st_size
        if size != k * k * 4:
            from mintbuild.errors import MintError

            raise MintError(f"{self.path}: {size:,} B is not a float32 Hessian of {k} x {k}")

    def _rows(self, i0: int, n: int) -> np.ndarray:
        return np.fromfile(self.path, dtype="<f4", count=n * self.k, offset=i0 * self.k * 4).reshape(
            n, self.k
        )

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, slice):
            i0, i1, step = rows.indices(self.k)
            if step != 1:
                raise IndexError("HessianFile reads contiguous or indexed rows only")
            return torch.from_numpy(self._rows(i0, max(i1 - i0, 0)))
        idx = torch.as_tensor(rows).reshape(-1).tolist()
        out = np.empty((len(idx), self.k), np.float32)
        for n, i in enumerate(idx):
            out[n] = self._rows(int(i), 1)[0]
        return torch.from_numpy(out)

    def diagonal(self) -> torch.Tensor:
        d = np.empty(self.k, np.float64)
        for i0 in range(0, self.k, 1024):
            rows = self._rows(i0, min(1024, self.k - i0))
            d[i0 : i0 + len(rows)] = rows[np.arange(len(rows)), np.arange(i0, i0 + len(rows))]
        return torch.from_numpy(d)

    def load(self) -> torch.Tensor:
        """The whole H in memory."""
        return torch.from_numpy(np.fromfile(self.path, dtype="<f4").reshape(self.k, self.k))

    @staticmethod
    def write(path: Path, h: torch.Tensor) -> HessianFile:
        """Store the float32 [K, K] `h` at `path` (raw, C order)."""
        h.detach().float().contiguous().numpy().astype("<f4", copy=False).tofile(path)
        return HessianFile(path, h.shape[0])
