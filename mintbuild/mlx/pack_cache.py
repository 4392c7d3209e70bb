"""The packer's cache of quantized tensors, shared by every target and by `mintbuild sweep --measure`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import xxhash

from mintbuild.formats import Option
from mintbuild.mlx.quant.reference import QUANTIZER_VERSION

log = logging.getLogger(__name__)


CACHE_TAG = f"{QUANTIZER_VERSION}|bf16|pack/1"


class PackCache:
    """Quantized tensors on disk, keyed by (content hash of the source tensor, option, quantizer version).

    One file per entry: 16-byte xxh3-128 digest of the payload, then the words, scales and biases bytes. The
    digest is checked on every read, so a torn or corrupted entry is recomputed, never used.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0
        self._made: set[Path] = set()  # fan-out folders known to exist (a mkdir per entry costs ~0.1 ms)

    def path(self, digest: str, option: Option) -> Path:
        assert self.root is not None
        key = xxhash.xxh3_128(f"{CACHE_TAG}|{digest}|{option.name}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}-{option.name}.bin"

    def get(self, digest: str, option: Option) -> memoryview | None:
        if self.root is None:
            return None
        p = self.path(digest, option)
        try:
            raw = p.read_bytes()
        except OSError:
            return None
        if len(raw) < 16 or xxhash.xxh3_128(memoryview(raw)[16:]).digest() != raw[:16]:
            log.warning("pack cache entry %s is corrupt; recomputing it", p)
            return None
        return memoryview(raw)[16:]

    def put(self, digest: str, option: Option, parts: list[memoryview]) -> None:
        """Store the payload given as its parts (written one after the other, never joined in memory)."""
        if self.root is None:
            return
        p = self.path(digest, option)
        if p.parent not in self._made:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(p.parent)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        h = xxhash.xxh3_128()
        for part in parts:
            h.update(part)
        # No fsync: a torn entry after a crash fails its digest and is recomputed.
        with open(tmp, "wb") as f:
            f.write(h.digest())
            for part in parts:
                f.write(part)
        os.replace(tmp, p)


def default_cache_dir(pack_out: Path) -> Path:
    env = os.environ.get("MINTBUILD_CACHE")
    return Path(env) / "pack" if env else Path(pack_out) / ".cache"
