"""The one table of storage-format facts.

Every byte count in mintbuild comes from here: the profile records `Option.nbytes`, the solver budgets with it,
the packer asserts that what it wrote equals it. An option is either 16-bit passthrough or MLX affine
quantization (`bits`, `group`): per group of `group` consecutive elements along the last (input) dimension, a
16-bit scale and a 16-bit bias; the codes are packed little-endian into uint32 words (MLX's layout, 3-, 5- and
6-bit codes straddle bytes).

GGUF (llama.cpp) storage types are `GGUFOption`s beside it, registered by ggml type name in `GGUF_OPTIONS`
(`parse_gguf_option("Q4_K")`): blocks of `block` values along the row, `type_size` bytes each. A GGUF profile
measures the option set `GGUF_OPTION_SETS["gguf"]` (BF16 is its 16-bit option) and records each tensor's bytes
padded to the file's alignment (`gguf_padded`), so that they add up to the file llama-quantize writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mintbuild.errors import MintError

#: Bytes per element of every tensor kept in 16 bits, and of each quantization scale and bias.
HALF_BYTES = 2
#: Bit widths and group sizes MLX's affine kernels implement.
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (32, 64, 128)
#: Bytes the safetensors header may take per stored tensor beyond the length of its name (the JSON entry
#: `"name":{"dtype":"BF16","shape":[a,b,c],"data_offsets":[x,y]},`), plus a fixed part for the 8-byte length
#: prefix and the `__metadata__` entry. The packer checks the real header against this allowance.
HEADER_BYTES_PER_ENTRY = 96
HEADER_BYTES_FIXED = 8 + 256

_NAME = re.compile(r"^(?:q(?P<bits>\d+)g(?P<group>\d+)|f16|bf16|16)$")


@dataclass(frozen=True, order=True)
class Option:
    """A storage option: `bits` == 16 means 16-bit passthrough (group 0)."""

    bits: int
    group: int = 0

    @property
    def passthrough(self) -> bool:
        return self.bits == 16

    @property
    def name(self) -> str:
        return "f16" if self.passthrough else f"q{self.bits}g{self.group}"

    def __str__(self) -> str:
        return self.name

    def unavailable_reason(self, shape: tuple[int, ...]) -> str | None:
        """Why the runtime cannot store a tensor of `shape` with this option, or None if it can."""
        if self.passthrough:
            return None
        if len(shape) < 2:
            return f"{len(shape)}-D tensors are never quantized"
        inner = shape[-1]
        if inner % self.group:
            return f"inner dimension {inner} is not a multiple of group {self.group}"
        return None

    def available(self, shape: tuple[int, ...]) -> bool:
        return self.unavailable_reason(shape) is None

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of the packed tensor(s): weight words + scales + biases, or 2 bytes per element."""
        n = math.prod(shape)
        if self.passthrough:
            return HALF_BYTES * n
        reason = self.unavailable_reason(shape)
        if reason:
            raise MintError(f"option {self.name} cannot store shape {list(shape)}: {reason}")
        rows = n // shape[-1]
        return rows * self.packed_row_bytes(shape[-1]) + 2 * HALF_BYTES * (n // self.group)

    def packed_row_bytes(self, inner: int) -> int:
        """Bytes of one packed row of codes: `inner * bits / 32` uint32 words."""
        return 4 * (inner * self.bits // 32)

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (packed uint32 weight, scales) as MLX stores them; biases have the scales' shape."""
        lead = tuple(shape[:-1])
        return (*lead, shape[-1] * self.bits // 32), (*lead, shape[-1] // self.group)


PASSTHROUGH = Option(16, 0)


def parse_option(name: str) -> Option:
    """Parse `q4g64`, `f16` (also `bf16`, `16`) into an Option; refuse what MLX cannot run."""
    m = _NAME.match(str(name).strip().lower())
    if not m:
        raise MintError(f"unknown option name {name!r}: expected qBgG (e.g. q4g64) or f16")
    if m.group("bits") is None:
        return PASSTHROUGH
    bits, group = int(m.group("bits")), int(m.group("group"))
    if bits not in MLX_BITS or group not in MLX_GROUPS:
        raise MintError(f"option {name!r}: MLX supports bits {list(MLX_BITS)} and groups {list(MLX_GROUPS)}")
    return Option(bits, group)


OPTION_SETS: dict[str, tuple[Option, ...]] = {
    # bits {2,3,4,5,6,8} x group {32,64,128} + 16-bit: 19 options.
    "default": (*tuple(Option(b, g) for b in MLX_BITS for g in MLX_GROUPS), PASSTHROUGH),
    # The published method's set.
    "seed": tuple(
        parse_option(n) for n in ("q2g32", "q3g64", "q4g32", "q4g64", "q4g128", "q8g64", "q8g128", "f16")
    ),
}


def option_set(spec: str | list[str] | tuple[str, ...]) -> tuple[Option, ...]:
    """An option set by name (`default`, `seed`) or as a list of option names; always includes 16-bit."""
    if isinstance(spec, str):
        if spec not in OPTION_SETS:
            raise MintError(f"unknown option set {spec!r}: known sets are {sorted(OPTION_SETS)}")
        return OPTION_SETS[spec]
    opts = sorted({parse_option(s) for s in spec})
    if PASSTHROUGH not in opts:
        opts.append(PASSTHROUGH)
    return tuple(opts)


def header_allowance(entry_names: list[str]) -> int:
    """Upper bound on the safetensors header for a file holding these tensor names."""
    return HEADER_BYTES_FIXED + sum(len(n) + HEADER_BYTES_PER_ENTRY for n in entry_names)


def stored_entry_names(name: str, option: Option) -> list[str]:
    """The tensor names a packed decision occupies in the file (`x.weight` -> weight, scales, biases)."""
    if option.passthrough:
        return [name]
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    return [name, f"{stem}.scales", f"{stem}.biases"]


# --- GGUF (llama.cpp) ------------------------------------------------------------------------------------------
#: GGUF aligns every tensor's data to this many bytes (general.alignment's default); the file writer pads with it.
GGUF_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFOption:
    """A ggml storage type: each row of `k` values (the last dimension, ggml's ne[0]) is cut into blocks of
    `block` values, each stored in `type_size` bytes; `passthrough` types (F32, F16, BF16) store values one by
    one and take any shape. Same interface as `Option`."""

    name: str
    ggml_type: int
    block: int
    type_size: int
    passthrough: bool = False
    requires_imatrix: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    @property
    def bits(self) -> float:
        """Storage bits per value, scales included (Q4_K: 4.5); what the allocation records as `bits`."""
        return self.bits_per_weight

    @property
    def group(self) -> int:
        """Values per block (the allocation's `group`)."""
        return self.block

    def unavailable_reason(self, shape: tuple[int, ...]) -> str | None:
        """Why llama.cpp cannot store a tensor of `shape` with this type, or None if it can."""
        if self.passthrough:
            return None
        if len(shape) < 2:
            return f"{len(shape)}-D tensors are never quantized"
        k = shape[-1]
        if k % self.block:
            return f"row length {k} is not a multiple of block {self.block}"
        return None

    def available(self, shape: tuple[int, ...]) -> bool:
        return self.unavailable_reason(shape) is None

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of `k` values (ggml_row_size); `k` must be a multiple of the block."""
        if k % self.block:
            raise MintError(f"type {self.name}: row length {k} is not a multiple of block {self.block}")
        return (k // self.block) * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of the tensor's data in a GGUF file (before the file's alignment padding)."""
        reason = self.unavailable_reason(shape)
        if reason:
            raise MintError(f"option {self.name} cannot store shape {list(shape)}: {reason}")
        n = math.prod(shape)
        if self.passthrough:
            return n * self.type_size
        return (n // shape[-1]) * self.row_bytes(shape[-1])


#: The ggml types a user would pick, with their block layouts (ggml-common.h): name -> option. `ggml_type` is
#: the enum value stored in the GGUF tensor info. IQ2_XXS, IQ2_XS and IQ1_S cannot be made without an imatrix.
GGUF_OPTIONS: dict[str, GGUFOption] = {
    o.name: o
    for o in (
        GGUFOption("F32", 0, 1, 4, passthrough=True),
        GGUFOption("F16", 1, 1, 2, passthrough=True),
        GGUFOption("BF16", 30, 1, 2, passthrough=True),
        GGUFOption("Q8_0", 8, 32, 34),
        GGUFOption("Q5_0", 6, 32, 22),
        GGUFOption("Q5_1", 7, 32, 24),
        GGUFOption("Q4_0", 2, 32, 18),
        GGUFOption("Q4_1", 3, 32, 20),
        GGUFOption("Q6_K", 14, 256, 210),
        GGUFOption("Q5_K", 13, 256, 176),
        GGUFOption("Q4_K", 12, 256, 144),
        GGUFOption("Q3_K", 11, 256, 110),
        GGUFOption("Q2_K", 10, 256, 84),
        GGUFOption("IQ4_NL", 20, 32, 18),
        GGUFOption("IQ4_XS", 23, 256, 136),
        GGUFOption("IQ3_S", 21, 256, 110),
        GGUFOption("IQ3_XXS", 18, 256, 98),
        GGUFOption("IQ2_S", 22, 256, 82),
        GGUFOption("IQ2_XS", 17, 256, 74, requires_imatrix=True),
        GGUFOption("IQ2_XXS", 16, 256, 66, requires_imatrix=True),
        GGUFOption("IQ1_M", 29, 256, 56),
        GGUFOption("IQ1_S", 19, 256, 50, requires_imatrix=True),
    )
}


def parse_gguf_option(name: str) -> GGUFOption:
    """Parse a ggml type name (`Q4_K`, `q4_k`, `f16`) into a GGUFOption; refuse mixes and unknown types."""
    key = str(name).strip().upper()
    if key in GGUF_OPTIONS:
        return GGUF_OPTIONS[key]
    hint = " (a llama.cpp mix, not a tensor type)" if re.fullmatch(r"(I?Q\d_\w+)_(XS|S|M|L)", key) else ""
    raise MintError(f"unknown GGUF type {name!r}{hint}: known types are {', '.join(GGUF_OPTIONS)}")


def gguf_padded(nbytes: int, alignment: int = GGUF_ALIGNMENT) -> int:
    """`nbytes` rounded up to the GGUF data alignment (what a tensor occupies in the file's data section)."""
    return -(-nbytes // alignment) * alignment


#: GGUF option sets (`profile.gguf_options`), each with BF16, the 16-bit passthrough (the converter's own output
#: type; 1-D tensors stay F32 as the converter writes them). "gguf_core": the k-quants and the legacy 32-blocks
#: Q4_0, Q5_0, Q8_0. "gguf" (default) adds the other 32-blocks Q4_1, Q5_1, IQ4_NL and IQ4_XS: rows whose length
#: is not a multiple of 256 (SmolLM2's 576) take no k-quant, and these fill the gaps between 4.5 and 8.5 bits;
#: on SmolLM2 at Q4_K_M's exact size they cut llama-perplexity's PPL from 30.12 to 29.87 (Q4_K_M: 30.41).
GGUF_OPTION_SETS: dict[str, tuple[str, ...]] = {
    "gguf_core": ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "BF16"),
    "gguf": (
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0",
        "Q4_1", "Q5_1", "IQ4_NL", "IQ4_XS", "BF16",
    ),
}  # fmt: skip
#: The passthrough type of a GGUF profile: what a 2-D tensor of the bf16 GGUF is when it is not quantized.
GGUF_PASSTHROUGH = GGUF_OPTIONS["BF16"]


def gguf_option_set(spec: str | list[str] | tuple[str, ...]) -> tuple[GGUFOption, ...]:
    """A GGUF option set by name (`gguf`) or as a list of ggml type names; always includes BF16, last."""
    if isinstance(spec, str):
        if spec not in GGUF_OPTION_SETS:
            raise MintError(f"unknown GGUF option set {spec!r}: known sets are {sorted(GGUF_OPTION_SETS)}")
        spec = GGUF_OPTION_SETS[spec]
    opts = [parse_gguf_option(s) for s in spec]
    bad = [o.name for o in opts if o.passthrough and o is not GGUF_PASSTHROUGH]
    if bad:
        raise MintError(f"GGUF option set: {bad} are passthrough types; the 16-bit option is BF16")
    quant = sorted({o for o in opts if not o.passthrough}, key=lambda o: (o.bits_per_weight, o.name))
    return (*quant, GGUF_PASSTHROUGH)


def any_option(name: str) -> Option | GGUFOption:
    """An MLX option name (`q4g64`, `f16`) or a ggml type name (`Q4_K`, `BF16`): what a profile lists."""
    if re.fullmatch(r"[A-Z0-9_]+", str(name)) and str(name) in GGUF_OPTIONS:
        return GGUF_OPTIONS[str(name)]
    return parse_option(name)


def passthrough_index(options: list[Option | GGUFOption] | tuple[Option | GGUFOption, ...]) -> int:
    """Index of the 16-bit passthrough option in an option list (f16 for MLX, BF16 for GGUF)."""
    for i, o in enumerate(options):
        if o.passthrough:
            return i
    raise MintError(f"option list {[o.name for o in options]} has no 16-bit passthrough option")
