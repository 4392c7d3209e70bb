"""Progress with an ETA for every long step: a tqdm bar on a terminal, periodic log lines everywhere else.

`progress(total, desc, unit, bar)` gives one reporter with `update(n)` and `close()` (also a context manager).
With `bar` true and stderr a terminal it is a tqdm bar (rate and ETA). Otherwise (`--no-progress`, the stages
DVC runs, a redirected stderr) it logs, at INFO on the `mintbuild.progress` logger, a line

    equalize: blocks 12/30 (40%), 1m05s elapsed, ETA 1m37s

at most every `interval` seconds (and at the first and last update), so a build that runs for an hour says
which step runs, how far it is and when it will end. The ETA is the mean rate so far times what is left.

`track(iterable, ...)` wraps an iterable the same way. A ground module: everyone may import it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger("mintbuild.progress")

#: Seconds between two log lines when no bar is shown.
INTERVAL = 10.0

T = TypeVar("T")


def duration(seconds: float) -> str:
    """`seconds` as 45s, 3m07s or 2h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LogProgress:
    """A reporter that logs done/total, elapsed and the ETA every `interval` seconds (and at the first and the
    last update)."""

    def __init__(self, total: float, desc: str, unit: str, interval: float = INTERVAL) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = 0.0
        self.postfix = ""
        self.start = time.monotonic()
        self.last: float | None = None

    def update(self, n: float = 1) -> None:
        self.done += n
        self.update_line()

    def update_line(self) -> None:
        """Log the line if `interval` seconds have passed since the last (or this is the first or the last)."""
        now = time.monotonic()
        if self.last is None or now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            log.info("%s", self.line(now))

    def set_postfix_str(self, text: str) -> None:
        """A note the next line ends with (as tqdm's): e.g. `12/211 tensors` when the unit is parameters."""
        self.postfix = text

    def line(self, now: float | None = None) -> str:
        """`desc done/total unit (pct%), elapsed, ETA` as of `now`."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if self.done >= self.total:
            eta = "done"
        elif self.done > 0:
            eta = "ETA " + duration(elapsed * (self.total - self.done) / self.done)
        else:
            eta = "ETA unknown"
        return (
            f"{self.desc} {_count(self.done)}/{_count(self.total)} {self.unit} ({pct:.0f}%), "
            f"{duration(elapsed)} elapsed, {eta}" + (f" [{self.postfix}]" if self.postfix else "")
        )

    def close(self) -> None:
        """Nothing to release: the last update already logged the end."""

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _count(x: float) -> str:
    """A count as read at a glance: 12, 3.5, 1.24M, 8.03G."""
    for div, suffix in ((1e9, "G"), (1e6, "M")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def progress(
    total: float, desc: str, unit: str = "it", bar: bool = True, interval: float = INTERVAL, **tqdm_kw: Any
) -> Any:
    """A reporter for `total` units of a step called `desc`: a tqdm bar when `bar` and stderr is a terminal,
    else a `LogProgress` that logs every `interval` seconds. Both have update(n), close() and `with`."""
    if bar and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, **tqdm_kw)
    return LogProgress(total, desc, unit, interval)


def track(
    items: Iterable[T], desc: str, unit: str = "it", bar: bool = True, total: int | None = None,
    interval: float = INTERVAL,
) -> Iterator[T]:  # fmt: skip
    """`items`, reported as they are consumed (one unit each) by `progress`."""
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with progress(n, desc, unit, bar, interval) as p:
        for x in items:
            yield x
            p.update(1)
