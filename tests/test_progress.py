"""Progress with an ETA: with the bar off (the stages DVC runs with --no-progress), log lines that say the step,
done/total, elapsed and the ETA; and every calibration step of the tiny model's importance and equalize stages
reports through it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from mintbuild.progress import LogProgress, duration, progress, track

LINE = re.compile(r"^(?P<desc>.+) (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), \S+ elapsed, "
                  r"(?P<eta>ETA \S+|done)")  # fmt: skip


def lines(caplog: pytest.LogCaptureFixture) -> list[re.Match]:
    return [m for r in caplog.records if r.name == "mintbuild.progress" and (m := LINE.match(r.getMessage()))]


def test_log_lines_say_done_total_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mintbuild.progress")
    p = progress(10, "step: blocks", "block", bar=False, interval=0.0)
    assert isinstance(p, LogProgress)  # bar=False never draws a bar, terminal or not
    for _ in range(3):
        p.update()
    got = lines(caplog)
    assert [(m["done"], m["total"], m["pct"]) for m in got] == [("1", "10", "10"), ("2", "10", "20"),
                                                                  ("3", "10", "30")]  # fmt: skip
    assert all(
        m["desc"] == "step: blocks" and m["unit"] == "block" and m["eta"].startswith("ETA ") for m in got
    )
    # ETA = mean time per unit so far x units left: 7 left after 3 done in 30 s -> 70 s
    p.start -= 30.0
    assert p.line(p.start + 30.0).endswith("30s elapsed, ETA 1m10s")


def test_the_interval_spaces_lines_and_the_end_is_always_said(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mintbuild.progress")
    assert list(track(range(50), "walk", "item", bar=False, interval=3600.0)) == list(range(50))
    got = lines(caplog)
    # the first update, then nothing for an hour, then the last one (done)
    assert got[0]["done"] == "1"
    assert (got[-1]["done"], got[-1]["total"], got[-1]["eta"]) == ("50", "50", "done")
    assert len(got) == 2


def test_durations() -> None:
    assert [duration(s) for s in (0, 45.4, 187, 7500)] == ["0s", "45s", "3m07s", "2h05m"]


def test_every_calibration_step_reports(caplog: pytest.LogCaptureFixture, corpus_dir: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    """The importance stage (Fisher forward and backward, the Hessians and gains) and equalize's blocks log
    done/total with an ETA when progress is off."""
    from mintbuild.config import EqualizeConfig, ImportanceConfig
    from mintbuild.stages import equalize, importance
    from tests.synth import tiny_llama

    caplog.set_level(logging.INFO, logger="mintbuild.progress")
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:200_000]
    tmp = tmp_path_factory.mktemp("progress")
    model = tiny_llama(tmp / "model", text)
    cfg = ImportanceConfig(n_windows=1, window=32, hessian_windows=2, threads=1)
    importance.run(model, corpus_dir, cfg, tmp / "imp", progress=False)
    equalize.run(model, corpus_dir, EqualizeConfig(n_windows=1, window=32, samples=16, rank=4, grid=3,
                                                   threads=1), tmp / "eq", progress=False)  # fmt: skip
    last = {m["desc"]: m for m in lines(caplog)}
    for desc in ("importance: forward", "importance: backward", "hessians: blocks", "equalize: blocks"):
        assert desc in last, (desc, sorted(last))
        assert last[desc]["done"] == last[desc]["total"] == "2" and last[desc]["unit"] == "block"
