"""The byte layout of the GGUF llama-quantize writes from the bf16 GGUF, known before any type is chosen.

One job: the fixed part of the file. llama-quantize copies the source GGUF's header and metadata, sets
`general.quantization_version` and `general.file_type` (uint32s the converter already wrote), and, with an
imatrix, adds four `quantize.imatrix.*` keys (tools/quantize/quantize.cpp); a tensor's type is a fixed-size field
of its info. So the data offset (the header, padded to the alignment) does not depend on the types, and the
file's size is that plus every tensor's bytes padded to the alignment (formats.gguf_padded).
"""

from __future__ import annotations

from typing import Any

from mintbuild.errors import MintError
from mintbuild.formats import GGUF_ALIGNMENT, gguf_padded
from mintbuild.llamacpp.imatrix import IMATRIX_GGUF, ImatrixFile

#: llama.cpp's `quantize.imatrix.*` keys (tools/quantize/quantize.cpp) and their GGUF value types.
_IMATRIX_KEYS_STR = ("quantize.imatrix.file", "quantize.imatrix.dataset")
_IMATRIX_KEYS_U32 = ("quantize.imatrix.entries_count", "quantize.imatrix.chunks_count")
#: GGUF metadata value types: uint32 = 4, string = 8.
_GGUF_U32, _GGUF_STRING = 4, 8
#: llama.cpp truncates the override strings to this many bytes (llama_model_kv_override.val_str[128]).
_KV_STR_MAX = 127


def meta_bytes(reader: Any) -> int:
    """Bytes of a GGUF's header, metadata and tensor infos (the data offset before alignment padding)."""
    end = 0
    for f in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        end = max(end, int(f.offset) + sum(int(p.nbytes) for p in f.parts))
    return end


def _kv_bytes(key: str, value_bytes: int) -> int:
    return 8 + len(key.encode()) + 4 + value_bytes


def quantized_header_bytes(reader: Any, imatrix: ImatrixFile | None) -> int:
    """The data offset of llama-quantize's output of the GGUF `reader` (with `imatrix` given as IMATRIX_GGUF):
    the source's metadata, plus the keys llama-quantize adds that the source lacks, padded to the alignment."""
    added = 0
    for key in ("general.quantization_version", "general.file_type"):
        f = reader.fields.get(key)
        if f is None:
            added += _kv_bytes(key, 4)
        elif [int(t) for t in f.types] != [_GGUF_U32]:
            raise MintError(
                f"{key} of the source GGUF is not a uint32: cannot predict llama-quantize's header"
            )
    if imatrix is not None:
        strings = {
            "quantize.imatrix.file": IMATRIX_GGUF,
            "quantize.imatrix.dataset": imatrix.datasets[0] if imatrix.datasets else None,
        }
        for key, value in strings.items():
            if value is not None:
                added += _kv_bytes(key, 8 + len(value.encode()[:_KV_STR_MAX]))
        added += _kv_bytes("quantize.imatrix.entries_count", 4)
        if imatrix.chunk_count > 0:
            added += _kv_bytes("quantize.imatrix.chunks_count", 4)
    for key in (*_IMATRIX_KEYS_STR, *_IMATRIX_KEYS_U32):
        if key in reader.fields:
            raise MintError(f"the source GGUF already has {key}: it was quantized before; convert it again")
    return gguf_padded(meta_bytes(reader) + added, _alignment(reader))


def _alignment(reader: Any) -> int:
    f = reader.fields.get("general.alignment")
    return int(f.contents()) if f is not None else GGUF_ALIGNMENT
