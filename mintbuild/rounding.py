"""Which rounding a quantized tensor gets at an option: the one rule the packer (which rounds it) and the
allocator (which prices it) share, so that what is priced is what is stored.

GPTQ is used where the importance stage measured an input Hessian and GPTQ's held-out gain at that option (its
output error over round-to-nearest's on calibration windows it was not fitted on) is below 1. Where the gain is
1 or more, GPTQ fitted the calibration windows but did worse than rounding to nearest on the others: such a
tensor is rounded to nearest and priced as such.
"""

from __future__ import annotations

#: The GPTQ arithmetic (gptq.py) the gains were measured with and the packer rounds with: recorded with the
#: importance stage's gains, in the packer's cache key and manifest; bump whenever gptq.py's numbers change.
GPTQ_VERSION = "gptq-mlx-affine/5"


def gptq_helps(gain: float) -> bool:
    """Whether a tensor with held-out GPTQ gain `gain` at an option is rounded by GPTQ there."""
    return gain < 1.0


def overfit_options(gains: dict[str, dict[str, float]]) -> dict[str, frozenset[str]]:
    """{tensor: the option names rounded to nearest although it has a Hessian} from {tensor: {option: gain}}."""
    out = {t: frozenset(o for o, r in g.items() if not gptq_helps(r)) for t, g in gains.items()}
    return {t: o for t, o in out.items() if o}
