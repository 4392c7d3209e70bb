"""The sampling estimator of the profiles (MLX and GGUF alike): a large tensor's error from a sample of its units.

The TAKE_ALL share of units (blocks or rows) with the widest ranges is measured whole (outliers carry most of the
variance of the error); the rest is a simple random sample, a prefix of a seeded order, so a growing sample only
measures what it adds. Each option's total squared error is the ratio estimator on an auxiliary that every unit
has (its squared range), and the sample grows until three standard errors of the option's NRMSE are within
NRMSE_REL_BOUND (0.5% relative); sizes are never estimated.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


#: Sampling stops growing once three standard errors of every option's NRMSE are below this relative bound.
NRMSE_REL_BOUND = 0.005


#: Share of a sampled tensor's units, those with the widest group ranges, that are measured whole.
TAKE_ALL = 0.01


def estimate_total(
    unit_sse: np.ndarray, unit_aux: np.ndarray, aux_total: np.ndarray, n_units: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ratio estimator of each option's total SSE from a simple random sample of units, and the relative
    standard error of the resulting NRMSE (half that of the SSE, since NRMSE is its square root).

    The auxiliary variable (per option, known for every unit) is the sum of squared group ranges: error scales
    with it, so the per-unit ratio varies far less than the SSE itself across rows of different scale and
    groups holding outliers, and a small sample pins the total down."""
    u = unit_sse.shape[0]
    aux_s = unit_aux.sum(axis=0)
    safe = np.where(aux_s > 0, aux_s, 1.0)
    ratio = np.where(aux_s > 0, unit_sse.sum(axis=0) / safe, 0.0)
    resid = unit_sse - unit_aux * ratio[None, :]
    fpc = math.sqrt(max(0.0, 1.0 - u / n_units))
    se_ratio = resid.std(axis=0, ddof=1) / math.sqrt(u) * fpc / np.maximum(unit_aux.mean(axis=0), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ratio > 0, se_ratio / ratio, 0.0)
    return ratio * aux_total, 0.5 * rel
