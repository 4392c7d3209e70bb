"""A revision's figures count only if its dvc.lock is consistent for the target (artifacts/provenance.py)."""

from __future__ import annotations

import copy

from mintbuild.artifacts.provenance import lock_is_current, workspace_is_current

PARAMS = {"targets": {"t": {"bits_per_weight": 4.0}}, "pack": {"damp": 0.1}}


def _lock() -> dict:
    out = {"path": "artifacts/allocate/t/allocation.json", "md5": "a" * 32}
    pack_out = {"path": "artifacts/pack/t", "md5": "b" * 32 + ".dir"}
    return {
        "allocate@t": {"params": {"params.yaml": {"targets.t": {"bits_per_weight": 4.0}}}, "outs": [out]},
        "pack@t": {
            "params": {"params.yaml": {"pack": {"damp": 0.1}}},
            "deps": [{"path": out["path"], "md5": out["md5"]}],
            "outs": [pack_out],
        },
        "evaluate@t": {"deps": [{"path": pack_out["path"], "md5": pack_out["md5"]}], "outs": []},
    }


def test_a_consistent_lock_is_current() -> None:
    assert lock_is_current(_lock(), PARAMS, "t", "evaluate")


def test_changed_params_or_a_half_refreshed_lock_is_not() -> None:
    params = copy.deepcopy(PARAMS)
    params["targets"]["t"]["bits_per_weight"] = 4.25
    assert not lock_is_current(_lock(), params, "t", "allocate")
    lock = _lock()
    lock["allocate@t"]["outs"][0]["md5"] = "c" * 32  # allocate re-ran, pack and evaluate did not
    assert lock_is_current(lock, PARAMS, "t", "allocate")
    assert not lock_is_current(lock, PARAMS, "t", "evaluate")
    del lock["evaluate@t"]
    assert not lock_is_current(lock, PARAMS, "t", "evaluate")


def test_workspace_staleness_follows_the_target_and_shared_stages() -> None:
    assert workspace_is_current(set(), "t", "evaluate")
    assert workspace_is_current({"allocate@u", "pack@u", "report"}, "t", "evaluate")
    assert not workspace_is_current({"evaluate@t"}, "t", "evaluate")
    assert workspace_is_current({"evaluate@t"}, "t", "allocate")
    assert not workspace_is_current({"importance"}, "t", "allocate")
    assert not workspace_is_current(None, "t", "allocate")  # DVC could not tell: never shown as current
