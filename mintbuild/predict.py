"""`mintbuild predict --budget X`: the perplexity the fitted curve predicts at a budget, before quantizing.

Uses artifacts/report/curve.json (written by `mintbuild report` from the measured targets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .budget import parse_size
from .curve import Curve
from .errors import MintError
from .report import DEFAULT_CURVE


def load_curve(path: Path) -> Curve:
    if not path.exists():
        raise MintError(
            f"{path}: no fitted curve yet (build and evaluate some targets, then `mintbuild report`)"
        )
    d = json.loads(path.read_text())
    return Curve(d["form"], d["params"], d["rmse"], d["n_points"])


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", required=True, nargs="+", help="budget(s) with a unit, e.g. 70MB")
    p.add_argument(
        "--curve",
        default=DEFAULT_CURVE,
        help=f"fitted curve (default: {DEFAULT_CURVE}, from `mintbuild report`)",
    )


def main(args: argparse.Namespace) -> None:
    curve = load_curve(Path(args.curve))
    print(f"# {curve.describe()}")
    for b in args.budget:
        print(f"{b}\t{curve.predict(parse_size(b, 'budget')):.3f}")
