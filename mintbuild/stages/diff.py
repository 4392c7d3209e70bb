"""`mintbuild diff <rev-a> [<rev-b>]`: a Markdown comment for a pull request that changes targets.

For every target in either revision: the budget change, bytes, average bits/weight, the measured perplexity
when that side evaluated the allocation it shows, the prediction of the fitted curve (when a report exists),
and the tensors whose storage choice changed (count and the largest by bytes). Each revision's params.yaml
comes from git; its allocations and metrics by the hashes its dvc.lock records (git, DVC's cache, or a working
tree file with those bytes), or from the working tree when the revision is omitted or given as `workspace`.

A figure is never stale: a side shows an allocation or a measurement only if the stages that wrote it are up
to date for that side (`dvc status` for the working tree, the lock's own consistency with its params for a
revision; mintbuild/artifacts/provenance.py); otherwise "not built", beside the prediction. At the end, every
target of the head revision built at its floor (the floor named) or not built (and why).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import yaml

from mintbuild.artifacts.curve import DEFAULT_CURVE
from mintbuild.artifacts.not_built import is_built, note_of
from mintbuild.artifacts.provenance import (
    WORKSPACE,
    lock_is_current,
    read_lock,
    read_out,
    stale_workspace_stages,
    workspace_is_current,
)
from mintbuild.budget import format_size
from mintbuild.errors import MintError
from mintbuild.placement import split_diff_rows

log = logging.getLogger(__name__)
NOT_BUILT = "not built"


def load_side(rev: str) -> dict[str, Any]:
    lock = read_lock(rev)
    text = read_out("params.yaml", rev, lock)
    if text is None:
        raise MintError(f"no params.yaml at revision {rev!r}")
    params = yaml.safe_load(text) or {}
    stale = stale_workspace_stages() if rev == WORKSPACE else None

    def current(name: str, upto: str) -> bool:
        if rev == WORKSPACE:
            return workspace_is_current(stale, name, upto)
        return lock_is_current(lock, params, name, upto)

    side: dict[str, Any] = {"params": params, "targets": {}}
    alloc_root = params.get("allocate_out", "artifacts/allocate")
    eval_root = params.get("eval_out", "artifacts/evaluate")
    for name in sorted(params.get("targets") or {}):
        alloc = (
            read_out(f"{alloc_root}/{name}/allocation.json", rev, lock) if current(name, "allocate") else None
        )
        metrics = (
            read_out(f"{eval_root}/{name}/metrics.json", rev, lock) if current(name, "evaluate") else None
        )
        side["targets"][name] = {
            "config": params["targets"][name],
            "allocation": json.loads(alloc) if alloc else None,
            "metrics": json.loads(metrics) if metrics else None,
        }
    report = read_out(DEFAULT_CURVE, rev, lock)
    side["curve"] = json.loads(report) if report else None
    return side


def changed_tensors(a: dict | None, b: dict | None) -> list[tuple[str, str, str, int]]:
    """(decision, option at a, option at b, bytes at b) for every decision whose option differs."""
    if not a or not b or not is_built(a) or not is_built(b):
        return []
    da = {d["name"]: d for d in a["decisions"]}
    out = []
    for d in b["decisions"]:
        old = da.get(d["name"])
        if old is None or old["option"] != d["option"]:
            out.append((d["name"], old["option"] if old else "-", d["option"], int(d["bytes"])))
    return sorted(out, key=lambda t: (-t[3], t[0]))


def _predict(curve: dict | None, budget: int | None) -> float | None:
    if not curve or budget is None:
        return None
    from mintbuild.curve import Curve

    c = Curve(curve["form"], curve["params"], curve["rmse"], curve["n_points"])
    try:
        return float(c.predict(budget))
    except MintError:
        return None


def target_section(name: str, a: dict | None, b: dict | None, curve_a, curve_b, top: int) -> list[str]:
    ta = (a or {}).get("allocation") or {}
    tb = (b or {}).get("allocation") or {}
    tot_a, tot_b = ta.get("totals", {}), tb.get("totals", {})
    status = "added" if a is None else "removed" if b is None else "changed"
    if (tb or ta).get("format") == "gguf":  # the runtime, when it is not the default MLX folder
        status += ", gguf"
    lines = [f"### `{name}` ({status})", "", "| | before | after |", "|---|---:|---:|"]
    lines.append(f"| budget | {_size(_budget(tot_a))} | {_size(_budget(tot_b))} |")
    lines.append(f"| bytes | {_size(tot_a.get('bytes'))} | {_size(tot_b.get('bytes'))} |")
    lines.append(
        f"| bits/weight | {_num(tot_a.get('avg_bits_per_weight'))} | {_num(tot_b.get('avg_bits_per_weight'))} |"
    )
    lines += split_diff_rows(ta, tb)
    lines.append(f"| measured PPL | {_measured(a)} | {_measured(b)} |")
    budget_a = _budget(tot_a) or _params_budget(a)
    budget_b = _budget(tot_b) or _params_budget(b)
    pa, pb = _predict(curve_a, budget_a), _predict(curve_b or curve_a, budget_b)
    if pa is not None or pb is not None:
        lines.append(f"| predicted PPL | {_num(pa)} | {_num(pb)} |")
    notes = tb.get("notes") or ta.get("notes") or []
    lines += ["", *[f"_Note: {n}._" for n in notes]] if notes else []
    why = status_line(tb or None)
    lines += ["", f"_{why}._"] if why else []
    changed = changed_tensors(ta or None, tb or None)
    if changed:
        lines += ["", f"{len(changed)} tensor choices changed; largest:", ""]
        lines += [f"- `{n}`: {o} -> {p} ({format_size(s)})" for n, o, p, s in changed[:top]]
    elif ta and tb:
        lines += ["", "No tensor choice changed."]
    elif not tb and b is not None:
        lines += ["", "_Not built at this revision (run `dvc repro`)._"]
    return [*lines, ""]


def _measured(side: dict | None) -> str:
    """The side's measured mean PPL, "not built" when that side has no current evaluation, "-" without it."""
    if side is None:
        return "-"
    metrics = side.get("metrics")
    return _num(metrics.get("ppl_mean")) if metrics else NOT_BUILT


def _params_budget(side: dict | None) -> int | None:
    """The budget a target's params state in bytes (`size`), when its allocation is not built."""
    if not side:
        return None
    size = (side.get("config") or {}).get("size")
    if size is None:
        return None
    from mintbuild.budget import parse_size

    try:
        return int(parse_size(size))
    except (MintError, ValueError, TypeError):
        return None


def status_line(alloc: dict[str, Any] | None) -> str | None:
    """One line when a target is not what it asked for: not built (and why), or built at its floor (named);
    None for a target built within its budget or not built yet."""
    if alloc is None:
        return None
    note = note_of(alloc)
    if note is not None:
        return f"Not built: {note}"
    t = alloc.get("totals", {})
    built = _budget(t)
    if built is not None and t.get("budget") is not None and built > t["budget"]:
        return f"Built at the floor {format_size(built)}, the minimum safe size (asked {format_size(t['budget'])})"
    return None


def _budget(totals: dict[str, Any]) -> int | None:
    """The budget the build was held to: the minimum safe size for a min_safe target below its floor."""
    return totals.get("effective_budget", totals.get("budget"))


def _size(v: int | None) -> str:
    return "-" if v is None else format_size(v)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render(rev_a: str, rev_b: str, top: int = 5) -> str:
    a, b = load_side(rev_a), load_side(rev_b)
    names = sorted(set(a["targets"]) | set(b["targets"]))
    out = [f"## mintbuild: targets {rev_a} -> {rev_b}", ""]
    touched = 0
    for name in names:
        ta, tb = a["targets"].get(name), b["targets"].get(name)
        if (
            ta
            and tb
            and ta["config"] == tb["config"]
            and changed_tensors(ta["allocation"], tb["allocation"]) == []
        ):
            continue
        touched += 1
        out += target_section(name, ta, tb, a["curve"], b["curve"], top)
    if not touched:
        out.append("No target changed.")
    # every target of the head that is not what it asked for, changed or not
    odd = [(n, status_line(t["allocation"])) for n, t in sorted(b["targets"].items())]
    odd = [(n, why) for n, why in odd if why]
    if odd:
        out += ["", f"Targets at {rev_b} that are not what they asked for:", ""]
        out += [f"- `{n}`: {why}" for n, why in odd]
    return "\n".join(out) + "\n"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("rev_a", help="base revision (git ref)")
    p.add_argument("rev_b", nargs="?", default=WORKSPACE, help="head revision (default: the working tree)")
    p.add_argument("--top", type=int, default=5, help="largest changed tensors listed per target")


def main(args: argparse.Namespace) -> None:
    print(render(args.rev_a, args.rev_b, args.top), end="")
