"""Synthetic MCKP instances shaped like real quantization profiles, for tests and benchmarks.

19 options per decision: MLX affine bits {2,3,4,5,6,8} x groups {32,64,128}, then 16-bit. Sizes follow the packed
layout, ceil(n*b/8) + (n/g)*4 bytes (2n for 16-bit); a group that does not divide the inner dimension is
unavailable. Costs are pi * NRMSE with the NRMSE of round-to-nearest on roughly Gaussian groups,
~ 2*sqrt(2 ln g) / ((2^b - 1) sqrt(12)), times a per-tensor heavy-tail factor and a little per-option noise;
options under the 9 dB SQNR floor are vetoed (inf), and a few decisions are forced to 16-bit (pi = inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_QUANTIZED = tuple((b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))
OPTIONS: tuple[tuple[int, int], ...] = (*_QUANTIZED, (16, 0))

#: (out, in) shapes of real LLM linear layers (SmolLM2, Llama-7B/8B, Mistral, Qwen), for "large" profiles.
LARGE_SHAPES = (
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (960, 960),
    (320, 960),
    (2560, 960),
    (960, 2560),
    (2048, 2048),
    (512, 2048),
    (5632, 2048),
    (2048, 5632),
    (4096, 4096),
    (1024, 4096),
    (11008, 4096),
    (4096, 11008),
    (14336, 4096),
    (4096, 14336),
)
#: Small shapes keep the dp table tiny (tests).
SMALL_SHAPES = tuple((o, i) for o in (32, 64, 96) for i in (64, 96, 128, 192, 256))


@dataclass(frozen=True)
class Profile:
    sizes: np.ndarray  # int64 [N, 19]
    costs: np.ndarray  # float64 [N, 19]
    weights: int  # total elements

    def budget(self, bits_per_weight: float) -> int:
        return math.floor(self.weights * bits_per_weight / 8)


def option_bytes(n: int, bits: int, group: int) -> int:
    if bits == 16:
        return 2 * n
    return -(-n * bits // 8) + (n // group) * 4


def synthetic_profile(
    n_rows: int, *, seed: int = 0, small: bool = False, veto_db: float = 9.0, forced_frac: float = 0.02
) -> Profile:
    rng = np.random.default_rng(seed)
    shapes = SMALL_SHAPES if small else LARGE_SHAPES
    picks = rng.integers(len(shapes), size=n_rows)
    sizes = np.zeros((n_rows, len(OPTIONS)), dtype=np.int64)
    costs = np.full((n_rows, len(OPTIONS)), np.inf)
    tail = rng.lognormal(0.1, 0.25, size=n_rows)  # heavier-tailed tensors quantize worse
    prior = rng.choice(
        [1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 10.0], size=n_rows, p=[0.3, 0.3, 0.2, 0.15, 0.02, 0.02, 0.01]
    )
    forced = rng.random(n_rows) < forced_frac
    noise = rng.lognormal(0.0, 0.03, size=(n_rows, len(OPTIONS)))
    weights = 0
    for i in range(n_rows):
        out_dim, in_dim = shapes[picks[i]]
        n = out_dim * in_dim
        weights += n
        for k, (b, g) in enumerate(OPTIONS):
            sizes[i, k] = option_bytes(n, b, g)
            if b == 16:
                # bf16 -> fp16 storage: tiny, nonzero error.
                costs[i, k] = 0.0 if forced[i] else prior[i] * 2.0**-12 * tail[i] * noise[i, k]
                continue
            if forced[i] or in_dim % g:
                continue
            nrmse = tail[i] * 2 * math.sqrt(2 * math.log(g)) / ((2**b - 1) * math.sqrt(12)) * noise[i, k]
            if -20 * math.log10(nrmse) >= veto_db:
                costs[i, k] = prior[i] * nrmse
    return Profile(sizes=sizes, costs=costs, weights=weights)
