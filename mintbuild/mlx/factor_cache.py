"""GPTQ's factor of each distinct input Hessian, made once and reused: by every option of the gains and by every
tensor and target the packer rounds against the same Hessian.

A factor (gptq.Factor: act order and the upper Cholesky factor U of the damped, reordered H^-1) depends only on
H's values, the damping and the GPTQ arithmetic, so it is keyed by the content: sha256 of H's dtype, shape and
bytes, the damp and GPTQ_VERSION. Kept in memory (the most recent ones, up to `memory_bytes`) and, with a
`root`, on disk: one file per factor, a 16-byte xxh3-128 digest of the payload then the order (int64) and U^T
(float32), the digest checked on every read so a torn or corrupt entry is recomputed, never used. `factor` is
computed on a fixed thread count (gptq.FACTOR_THREADS), so a stored factor is bit for bit the one a fresh call
gives (tests/test_gptq.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import xxhash

from mintbuild.mlx.gptq import Factor, HessianRows, factor
from mintbuild.rounding import GPTQ_VERSION

log = logging.getLogger(__name__)

CACHE_TAG = f"{GPTQ_VERSION}|factor/1"
#: The factors' folder inside the pack cache (whose own entries sit in two-hex-digit folders).
FACTOR_FOLDER = "gptq-factors"


def hessian_digest(hessian: HessianRows) -> str:
    """sha256 of the Hessian's dtype, shape and bytes (C order); a HessianFile hashes as the float32 tensor it
    holds, read a few rows at a time."""
    if isinstance(hessian, torch.Tensor):
        h = hessian.detach().contiguous()
        sha = hashlib.sha256(f"{h.dtype}|{list(h.shape)}|".encode())
        sha.update(memoryview(h.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]  # numpy's stubs: ndarray is a buffer on 3.11 too
        return sha.hexdigest()
    k = hessian.shape[0]
    sha = hashlib.sha256(f"{torch.float32}|{[k, k]}|".encode())
    for i0 in range(0, k, 1024):
        sha.update(memoryview(hessian[i0 : i0 + 1024].contiguous().reshape(-1).view(torch.uint8).numpy()))
    return sha.hexdigest()


class FactorCache:
    """Factors by (Hessian content, damp, GPTQ version); `hits` and `misses` count the lookups."""

    def __init__(self, root: Path | None = None, memory_bytes: int = 1 << 30) -> None:
        self.root = root
        self.memory_bytes = memory_bytes
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, Factor] = OrderedDict()

    def key(self, hessian: HessianRows, damp: float) -> str:
        return hashlib.sha256(f"{CACHE_TAG}|{hessian_digest(hessian)}|{damp!r}".encode()).hexdigest()

    def get(self, hessian: HessianRows, damp: float) -> Factor:
        """`gptq.factor(hessian, damp)`, from memory or disk when made before."""
        key = self.key(hessian, damp)
        fac = self._memory.get(key)
        if fac is None:
            fac = self._read(key, hessian.shape[0])
        if fac is None:
            self.misses += 1
            fac = factor(hessian, damp)
            self._write(key, fac)
        else:
            self.hits += 1
        self._remember(key, fac)
        return fac

    def _remember(self, key: str, fac: Factor) -> None:
        self._memory[key] = fac
        self._memory.move_to_end(key)
        while self._memory and sum(f.ut.numel() * 4 for f in self._memory.values()) > self.memory_bytes:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.factor"

    def _read(self, key: str, k: int) -> Factor | None:
        if self.root is None:
            return None
        p = self._path(key)
        try:
            raw = p.read_bytes()
        except OSError:
            return None
        body = memoryview(raw)[16:]
        if len(body) != k * 8 + k * k * 4 or xxhash.xxh3_128(body).digest() != raw[:16]:
            log.warning("GPTQ factor cache entry %s is corrupt; recomputing it", p)
            return None
        perm = torch.from_numpy(np.frombuffer(body[: k * 8], dtype="<i8").copy())
        ut = torch.from_numpy(np.frombuffer(body[k * 8 :], dtype="<f4").reshape(k, k).copy())
        return Factor(perm, ut)

    def _write(self, key: str, fac: Factor) -> None:
        if self.root is None:
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        parts = [
            memoryview(np.ascontiguousarray(fac.perm.numpy(), dtype="<i8")).cast("B"),  # type: ignore[arg-type]  # numpy's stubs: ndarray is a buffer on 3.11 too
            memoryview(np.ascontiguousarray(fac.ut.numpy(), dtype="<f4")).cast("B"),  # type: ignore[arg-type]  # numpy's stubs: ndarray is a buffer on 3.11 too
        ]
        h = xxhash.xxh3_128()
        for part in parts:
            h.update(part)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # no fsync: a torn entry fails its digest and is recomputed
            f.write(h.digest())
            for part in parts:
                f.write(part)
        os.replace(tmp, p)
