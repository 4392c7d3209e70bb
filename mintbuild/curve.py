"""The two quality predictors, fitted to measured targets and used to predict perplexity before packing.

- `Curve`, from the budget alone: PPL(B) = a + b / (B - B0)^c, fitted robustly.
- `ObjectiveFit`, from the allocation itself: ln PPL = ln PPL_16bit + b x O, O the allocation's objective
  (`allocation.json` totals.objective). For the fisher objective O = sum alpha x SSE is a diagonal-Fisher
  (second-order) estimate of the loss increase, and ln PPL is the mean loss, so the rise is linear in O with
  an intercept known from the 16-bit model; one slope is fitted. Allocating takes milliseconds, so this
  predicts any budget (and any allocation) before anything is packed.
- `leave_one_out`: each point predicted by a fit to the others, the error the report shows for both.

Curve: B0 is constrained below the smallest measured budget (the curve's pole sits near the uniform-low-bit floor),
a, b > 0 and c in [0.1, 8]. Budgets are scaled to their largest value so the fit is well conditioned. With
fewer than four points the model is simplified (c = 1 with three points; B0 = 0, c = 1 with two), so a
prediction is never an extrapolation of an under-determined fit. Soft-L1 loss keeps one bad point from
dragging the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from mintbuild.errors import MintError


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

    best: Any = None  # scipy's OptimizeResult of the lowest cost so far
    for f in (0.0, 0.5, 0.8, 0.9, 0.97) if free_b0 else (0.0,):
        for c0 in (0.5, 1.0, 2.0) if free_c else (1.0,):
            theta0 = [
                max(y.min() * 0.9, a_min, 1e-6),
                max((y.max() - y.min()) * (xs.min() * (1 - f)) ** c0, 1e-9),
            ]
            lo, up = [a_min, 0.0], [np.inf, np.inf]
            if free_c:
                theta0.append(c0)
                lo.append(0.1)
                up.append(8.0)
            if free_b0:
                theta0.append(f * hi_b0)
                lo.append(0.0)
                up.append(hi_b0)
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


@dataclass(frozen=True)
class ObjectiveFit:
    """ln PPL(O) = a + b x O (a = ln PPL_16bit when the baseline anchors it)."""

    form: str
    #: a (ln PPL at objective 0), b (ln PPL per unit of objective).
    params: dict[str, float]
    #: Root-mean-square error of ln PPL on the fitted points (0.01 = about 1% in PPL).
    rmse: float
    n_points: int

    def predict(self, objective: float | np.ndarray) -> float | np.ndarray:
        o = np.asarray(objective, dtype=float)
        if np.any(o < 0) or not np.all(np.isfinite(o)):
            raise MintError(f"objective {o.min() if o.size else o!r} must be finite and non-negative")
        y = np.exp(self.params["a"] + self.params["b"] * o)
        return float(y) if np.ndim(objective) == 0 else y

    def describe(self) -> str:
        p = self.params
        return (
            f"ln PPL = {p['a']:.4f} + {p['b']:.4g} x objective  "
            f"[{self.form}, {self.n_points} points, RMSE {self.rmse:.3g} in ln PPL]"
        )


def fit_objective(objective, ppl, baseline_ppl: float | None = None) -> ObjectiveFit:
    """Fit ln PPL = a + b x O to measured (objective, perplexity) points by least squares in ln PPL. With the
    16-bit model's `baseline_ppl` (objective 0: nothing quantized), a = ln baseline_ppl and only the slope is
    fitted (form "anchored"); without it, both (form "free", at least two points with distinct objectives)."""
    o = np.asarray(objective, dtype=float)
    y = np.log(np.asarray(ppl, dtype=float))
    if o.shape != y.shape or o.ndim != 1 or len(o) == 0:
        raise MintError(
            f"fit_objective needs equal-length 1-D objectives and PPLs, got {o.shape} and {y.shape}"
        )
    if not (np.all(np.isfinite(o)) and np.all(o >= 0) and np.all(np.isfinite(y))):
        raise MintError("fit_objective: objectives must be finite and non-negative, PPLs finite and positive")
    if baseline_ppl is not None:
        a = math.log(baseline_ppl)
        denom = float(o @ o)
        b = float(o @ (y - a)) / denom if denom > 0 else 0.0
        form = "anchored"
    else:
        if len(o) < 2 or np.ptp(o) == 0:
            raise MintError(
                "fit_objective without a 16-bit baseline needs two points with distinct objectives"
            )
        b, a = (float(v) for v in np.polyfit(o, y, 1))
        form = "free"
    rmse = float(np.sqrt(np.mean((a + b * o - y) ** 2)))
    return ObjectiveFit(form, {"a": a, "b": b}, rmse, len(o))


def leave_one_out(
    x, y, fit: Callable[[np.ndarray, np.ndarray], Any], min_points: int = 2
) -> list[float | None]:
    """For each i, `fit(x without i, y without i).predict(x[i])`; None where fewer than `min_points` others
    remain or that fit or prediction fails (a budget at or below the curve's pole)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out: list[float | None] = []
    if len(x) - 1 < min_points:
        return [None] * len(x)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        try:
            out.append(float(fit(x[keep], y[keep]).predict(x[i])))
        except MintError:
            out.append(None)
    return out


def _curve(form: str, params: dict[str, float], x: np.ndarray, y: np.ndarray) -> Curve:
    params = {k: float(v) for k, v in params.items()}
    c = Curve(form, params, 0.0, len(x), tuple(float(v) for v in x))
    rmse = float(np.sqrt(np.mean((c.predict(x) - y) ** 2)))
    return Curve(form, params, rmse, len(x), c.budgets)
