"""The prediction curve against points drawn from a known curve."""

from __future__ import annotations

import numpy as np
import pytest

from mintbuild.curve import fit_curve
from mintbuild.errors import MintError


def truth(b: np.ndarray) -> np.ndarray:
    # Shaped like SmolLM2's: 16-bit PPL ~25, a pole near the 3-bit floor (~55 MB).
    return 24.6 + 2.0e3 / ((b - 52e6) / 1e6) ** 1.6


def test_recovers_a_known_curve_and_predicts_held_out_budgets() -> None:
    rng = np.random.default_rng(0)
    b = np.array([58e6, 62e6, 67e6, 75e6, 84e6, 100e6, 135e6])
    y = truth(b) * (1 + rng.normal(0, 0.01, b.size))
    c = fit_curve(b, y)
    assert c.form == "a+b/(B-B0)^c" and c.params["B0"] < b.min()
    held = np.array([60e6, 70e6, 90e6, 120e6])
    np.testing.assert_allclose(c.predict(held), truth(held), rtol=0.03)
    assert c.rmse < 0.03 * y.mean()
    assert np.all(np.diff(c.predict(np.linspace(59e6, 135e6, 20))) < 0)  # more bytes, lower PPL


def test_one_bad_point_does_not_drag_the_fit() -> None:
    b = np.array([58e6, 62e6, 67e6, 75e6, 84e6, 100e6, 135e6])
    y = truth(b)
    y[4] *= 1.5  # a broken measurement
    c = fit_curve(b, y)
    assert abs(c.predict(70e6) / truth(70e6) - 1) < 0.05


def test_few_points_use_simpler_forms() -> None:
    b = np.array([60e6, 80e6, 120e6])
    assert fit_curve(b, truth(b)).form == "a+b/(B-B0)"
    assert fit_curve(b[:2], truth(b[:2])).form == "a+b/B"
    assert fit_curve(b[:1], truth(b[:1])).predict(90e6) == pytest.approx(truth(b[:1])[0])


def test_bad_input_and_predictions_below_the_pole() -> None:
    b = np.array([58e6, 62e6, 67e6, 75e6, 84e6])
    c = fit_curve(b, truth(b))
    with pytest.raises(MintError, match="pole"):
        c.predict(c.params["B0"] * 0.5)
    with pytest.raises(MintError):
        fit_curve([1, 2], [1.0])
    with pytest.raises(MintError):
        fit_curve([1, 2], [1.0, float("nan")])
