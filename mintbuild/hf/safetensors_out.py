"""A safetensors file written one tensor at a time, byte for byte as `safetensors.torch.save_file` writes it.

`save_file` needs every tensor in memory at once; a stage that rewrites a large checkpoint block by block
(equalize) cannot hold them. The layout only depends on the names, dtypes and shapes, which are known before any
value is: the header and every tensor's offset are fixed up front, the file is sized, and each tensor's bytes
are written at its offset whenever it is ready. The tensor order is taken from safetensors itself (it sorts by
dtype, then name, with an order of dtypes that is its own), by saving zero-size stand-ins, so the bytes match
whatever version is installed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError

#: safetensors dtype name -> torch dtype name
TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def safetensors_order(specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> list[str]:
    """The order in which `save_file` stores tensors of these names and dtypes (zero-size stand-ins saved)."""
    import torch
    from safetensors.torch import save

    stand_ins = {n: torch.empty((0,), dtype=getattr(torch, TORCH_DTYPES[d])) for n, (d, _) in specs.items()}
    blob = save(stand_ins, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    return [k for k in json.loads(blob[8 : 8 + n]) if k != "__metadata__"]


class StreamedSafetensors:
    """A safetensors file at `path` with the tensors `specs` ({name: (safetensors dtype, shape)}), filled by
    `write(name, tensor)` in any order. A context manager: leaving it normally checks that every tensor was
    written and syncs the file; the file descriptor is closed either way."""

    def __init__(self, path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        unknown = sorted(n for n, (d, _) in specs.items() if d not in _SIZES)
        if unknown:
            raise MintError(f"{path}: cannot write tensor {unknown[0]!r} of dtype {specs[unknown[0]][0]}")
        self.path, self.specs = Path(path), specs
        header: dict[str, Any] = {"__metadata__": metadata}
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in safetensors_order(specs, metadata):
            dtype, shape = specs[name]
            size = math.prod(shape) * _SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.offsets[name] = (offset, offset + size)
            offset += size
        # serde_json's compact form (no spaces, UTF-8 as is), padded with spaces to 8 bytes as safetensors does
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.written: set[str] = set()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self.data_start + offset)

    def write(self, name: str, tensor: Any) -> None:
        """Store `tensor` (a torch tensor of the declared dtype and shape) under `name`."""
        import torch

        dtype, shape = self.specs[name]
        if tensor.dtype != getattr(torch, TORCH_DTYPES[dtype]) or tuple(tensor.shape) != tuple(shape):
            raise MintError(
                f"{self.path}: {name} is {tensor.dtype} {list(tensor.shape)}, not {dtype} {list(shape)}"
            )
        start, end = self.offsets[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        pos = 0
        while pos < end - start:  # pwrite may write less than asked (large tensors)
            pos += os.pwrite(self._fd, view[pos:], self.data_start + start + pos)
        self.written.add(name)

    def __enter__(self) -> StreamedSafetensors:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                missing = sorted(set(self.specs) - self.written)
                if missing:
                    raise MintError(f"{self.path}: {len(missing)} tensors never written, e.g. {missing[0]}")
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
