"""The one table of storage-format facts.

Every byte count in mintbuild comes from here: the profile records `Option.nbytes`, the solver budgets with it,
the packer asserts that what it wrote equals it. An option is either 16-bit passthrough or MLX affine
quantization (`bits`, `group`): per group of `group` consecutive elements along the last (input) dimension, a
16-bit scale and a 16-bit bias; the codes are packed little-endian into uint32 words (MLX's layout, 3-, 5- and
6-bit codes straddle bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import MintError

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
