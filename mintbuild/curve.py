"""The quality-vs-budget curve: PPL(B) = a + b / (B - B0)^c, fitted robustly, used to predict before packing.

B0 is constrained below the smallest measured budget (the curve's pole sits near the uniform-low-bit floor),
a, b > 0 and c in [0.1, 8]. Budgets are scaled to their largest value so the fit is well conditioned. With
fewer than four points the model is simplified (c = 1 with three points; B0 = 0, c = 1 with two), so a
prediction is never an extrapolation of an under-determined fit. Soft-L1 loss keeps one bad point from
dragging the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from .errors import MintError


@dataclass(frozen=True)
class Curve:
    form: str
    #: a, b, c, B0 (B0 in bytes).
    params: dict[str, float]
    rmse: float
    n_points: int
    budgets: tuple[float, ...] = field(default=(), repr=False)

    def predict(self, budget: float | np.ndarray) -> float | np.ndarray:
        p = self.params
        b = np.asarray(budget, dtype=float)
        if np.any(b <= p["B0"]):
            raise MintError(
                f"budget {float(np.min(b)):,.0f} B is at or below the curve's pole B0 = {p['B0']:,.0f} B: "
                "no quality can be predicted there (the model does not fit; see the minimum safe size)"
            )
        y = p["a"] + p["b"] / np.power(b / p["scale"] - p["B0"] / p["scale"], p["c"])
        return float(y) if np.ndim(budget) == 0 else y

    def describe(self) -> str:
        p = self.params
        return (
            f"PPL(B) = {p['a']:.4g} + {p['b']:.4g} / (B/{p['scale']:.4g} - {p['B0'] / p['scale']:.4g})^{p['c']:.3g}"
            f"  [{self.form}, {self.n_points} points, RMSE {self.rmse:.3g}]"
        )


def fit_curve(budgets, ppl, a_min: float = 0.0) -> Curve:
    """Fit PPL(B) to measured (budget bytes, perplexity) points. `a_min` bounds the asymptote from below: pass
    the 16-bit model's PPL, which no quantized model beats (up to noise), so extrapolation stays physical."""
    x = np.asarray(budgets, dtype=float)
    y = np.asarray(ppl, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise MintError(f"fit_curve needs equal-length 1-D budgets and PPLs, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise MintError("fit_curve: budgets and PPLs must be finite and positive")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    scale = float(x.max())
    if len(x) == 1:
        return _curve("constant", {"a": float(y[0]), "b": 0.0, "c": 1.0, "B0": 0.0, "scale": scale}, x, y)
    if len(x) == 2:
        return _fit(x, y, scale, free_c=False, free_b0=False, a_min=a_min)
    if len(x) == 3:
        return _fit(x, y, scale, free_c=False, free_b0=True, a_min=a_min)
    return _fit(x, y, scale, free_c=True, free_b0=True, a_min=a_min)


def _fit(
    x: np.ndarray, y: np.ndarray, scale: float, free_c: bool, free_b0: bool, a_min: float = 0.0
) -> Curve:
    a_min = min(a_min, float(y.min()) * (1 - 1e-6))  # the bound must leave the data reachable
    xs = x / scale
    hi_b0 = xs.min() * (1 - 1e-3)

    def unpack(theta: np.ndarray) -> tuple[float, float, float, float]:
        a, b = theta[0], theta[1]
        c = theta[2] if free_c else 1.0
        b0 = theta[-1] if free_b0 else 0.0
        return a, b, c, b0

    def resid(theta: np.ndarray) -> np.ndarray:
        a, b, c, b0 = unpack(theta)
        return a + b / np.power(xs - b0, c) - y

    best = None
    for f in (0.0, 0.5, 0.8, 0.9, 0.97) if free_b0 else (0.0,):
        for c0 in (0.5, 1.0, 2.0) if free_c else (1.0,):
            theta0 = [
                max(y.min() * 0.9, a_min, 1e-6),
                max((y.max() - y.min()) * (xs.min() * (1 - f)) ** c0, 1e-9),
            ]
            lo, up = [a_min, 0.0], [np.inf, np.inf]
            if free_c:
                theta0.append(c0), lo.append(0.1), up.append(8.0)
            if free_b0:
                theta0.append(f * hi_b0), lo.append(0.0), up.append(hi_b0)
            theta0 = np.clip(
                theta0, lo, [u if math.isfinite(u) else t for u, t in zip(up, theta0, strict=True)]
            )
            r = least_squares(
                resid, theta0, bounds=(lo, up), loss="soft_l1", f_scale=0.05 * float(np.median(y))
            )
            if best is None or r.cost < best.cost:
                best = r
    a, b, c, b0 = unpack(best.x)
    form = "a+b/(B-B0)^c" if free_c else ("a+b/(B-B0)" if free_b0 else "a+b/B")
    return _curve(form, {"a": a, "b": b, "c": c, "B0": b0 * scale, "scale": scale}, x, y)


def _curve(form: str, params: dict[str, float], x: np.ndarray, y: np.ndarray) -> Curve:
    params = {k: float(v) for k, v in params.items()}
    c = Curve(form, params, 0.0, len(x), tuple(float(v) for v in x))
    rmse = float(np.sqrt(np.mean((c.predict(x) - y) ** 2)))
    return Curve(form, params, rmse, len(x), c.budgets)
