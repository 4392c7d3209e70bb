"""Where a stage's heavy loop runs: in this process (the default), or as tasks on a Ray cluster.

A stage hands `executor().map(fn, items, Resources(...), label=...)` a module-level function and a list of
small picklable items (paths on a filesystem every node sees, names, settings; never the model's tensors) and
gets `[fn(item) for item in items]` back, in input order, wherever each item ran. So where a stage ran changes
neither its DVC params nor its outputs: the cluster is chosen by the environment, never by params.yaml.

- In process (default; `MINTBUILD_CLUSTER` unset, empty or `local`): exactly the list comprehension above, on
  the stage's own threads. This module then never imports ray.
- Ray (`MINTBUILD_CLUSTER=ray`, or `--cluster ray` on a stage run by hand): connects to the running cluster at
  Ray's own `RAY_ADDRESS` (default `auto`: the cluster `ray start` left on this machine; none is ever started
  here). Before any work every node reports its mintbuild version and source hash, library versions and CPU
  dispatch features (`node_report`); a node that differs from this machine is refused with one MintError line
  naming it and the difference. Each task sets its own torch and numba threads (Ray's num_cpus reserves cores
  but does not cap a library's thread pool), requests its memory (so a wide task lands on a node that can hold
  it), and is retried on another worker when its worker or node is lost (Ray's max_retries; a task that raises
  is not retried: the same input would raise again). Per-task node, pid and seconds go to a timings file
  outside every DVC output (`timings_dir()`), which DVC does not hash.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mintbuild.errors import MintError
from mintbuild.node_report import node_report, report_difference

#: Environment variable choosing the executor: unset/"local" (in process) or "ray".
ENV_CLUSTER = "MINTBUILD_CLUSTER"
#: Folder of the per-stage timings files (default: artifacts/.cluster under the working directory, which no
#: stage lists as an output).
ENV_TIMINGS = "MINTBUILD_CLUSTER_TIMINGS"
#: Retries of a task whose worker or node died (default 3, Ray's own default made explicit).
ENV_RETRIES = "MINTBUILD_CLUSTER_RETRIES"
#: TEST ONLY: seconds every task waits before its work (read on the driver), so that a test can kill a worker
#: while it holds a task. Never set it for a real build.
ENV_TEST_DELAY = "MINTBUILD_TEST_TASK_DELAY"
CHOICES = ("local", "ray")
DEFAULT_TIMINGS = Path("artifacts/.cluster")
#: Seconds a node may take to answer the version probe (a fresh worker imports nothing heavy for it).
PROBE_TIMEOUT = 120.0

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Resources:
    """What one task needs: `cpus` cores reserved, `memory` bytes (0: no request), and the torch/numba
    threads it runs (0: one per reserved core)."""

    cpus: float = 1.0
    memory: int = 0
    threads: int = 0

    @property
    def task_threads(self) -> int:
        return self.threads or max(1, int(self.cpus))


class Executor(Protocol):
    name: str
    #: True when tasks leave this process (their inputs must then be paths every node can read).
    remote: bool

    @property
    def slots(self) -> int:
        """Tasks of one core that can run at once (1 in process)."""
        ...

    @property
    def node_cpus(self) -> int:
        """Cores of the largest node: the most one task can reserve."""
        ...

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        resources: Resources | None = None,
        label: str = "tasks",
        progress: bool = True,
    ) -> list[R]: ...

    def submit(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        resources: Resources | None = None,
        label: str = "tasks",
        progress: bool = True,
    ) -> Callable[[], list[R]]:
        """`map` without waiting: the returned call waits and gives `map`'s list (in process: computed now)."""
        ...


class InProcess:
    """Today's behaviour: every item in this process, in order, on the stage's own threads."""

    name = "local"
    remote = False
    slots = 1
    node_cpus = 1

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        resources: Resources | None = None,
        label: str = "tasks",
        progress: bool = True,
    ) -> list[R]:
        return self.submit(fn, items, resources, label, progress)()

    def submit(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        resources: Resources | None = None,
        label: str = "tasks",
        progress: bool = True,
    ) -> Callable[[], list[R]]:
        results = [fn(item) for item in items]
        return lambda: results


# ---------------------------------------------------------------- choosing


def choose(name: str | None) -> None:
    """Select the executor for this process and the processes it starts (a stage's `--cluster` flag)."""
    if name is None:
        return
    _check_choice(name)
    os.environ[ENV_CLUSTER] = name
    executor.cache_clear()


def _check_choice(name: str) -> str:
    name = name.strip().lower() or "local"
    if name not in CHOICES:
        raise MintError(f"{ENV_CLUSTER}={name!r}: choose one of {', '.join(CHOICES)}")
    return name


@cache
def executor() -> Executor:
    """The executor `MINTBUILD_CLUSTER` selects (one per process: a Ray connection is made and checked once)."""
    name = _check_choice(os.environ.get(ENV_CLUSTER, ""))
    if name == "local":
        return InProcess()
    return RayExecutor(os.environ.get("RAY_ADDRESS") or "auto")


def batches(weights: Sequence[int], parts: int) -> list[range]:
    """Contiguous index ranges covering `weights` in order, `parts` of them (fewer when there are fewer items):
    a range ends where the running total first reaches its share of the whole, or where the items left are
    just enough for the ranges left."""
    n = len(weights)
    parts = max(1, min(parts, n))
    total = sum(weights) or 1
    out: list[range] = []
    start, acc = 0, 0
    for i, w in enumerate(weights):
        acc += w
        k = len(out) + 1
        left = n - (i + 1)  # items after this one; every later range needs one
        if k < parts and left >= parts - k and (acc * parts >= k * total or left == parts - k):
            out.append(range(start, i + 1))
            start = i + 1
    out.append(range(start, n))
    return [r for r in out if len(r)]


def _probe() -> tuple[dict[str, str], str]:
    """A node's report and its address (runs as a Ray task pinned to the node)."""
    import ray

    return node_report(), ray.util.get_node_ip_address()


def _run_task(
    fn: Callable[[Any], Any], item: Any, threads: int, delay: float = 0.0
) -> tuple[Any, dict[str, Any]]:
    """fn(item) on `threads` torch and numba threads, with where and how long it ran (`delay`: test only)."""
    import sys

    import ray

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if delay:
        time.sleep(delay)
    t0 = time.perf_counter()
    result = fn(item)
    ctx = ray.get_runtime_context()
    return result, {
        "node": ctx.get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "threads": threads,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _connect(ray: Any, address: str) -> None:
    """ray.init from the folder that holds this mintbuild package: Ray puts the driver's working directory
    first on every worker's import path, and a DVC repository may carry its own copy of mintbuild/ (the node
    check would refuse it when it differs, and a second copy also misses the numba kernel cache)."""
    cwd = Path.cwd()
    os.chdir(Path(__file__).resolve().parent.parent)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    finally:
        os.chdir(cwd)


class RayExecutor:
    """Tasks on the Ray cluster at `address`, after every node has been checked against this machine."""

    name = "ray"
    remote = True

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise MintError(
                f"{ENV_CLUSTER}=ray needs Ray on this machine and every node: pip install 'mintbuild[ray]'"
            ) from None
        self._ray = ray
        self.retries = int(os.environ.get(ENV_RETRIES, "3"))
        if not ray.is_initialized():
            try:
                _connect(ray, address)
            except (ConnectionError, RuntimeError) as e:
                raise MintError(
                    f"{ENV_CLUSTER}=ray: no Ray cluster at {address!r} ({str(e).splitlines()[0]}); start one "
                    "with `ray start --head` (docs/cluster.md) or set RAY_ADDRESS"
                ) from None
        self._remote = ray.remote(_run_task)
        self._probe = ray.remote(_probe)
        self.checked: dict[str, str] = {}  # node id -> address, for nodes whose report matched
        self.check_nodes()

    @property
    def slots(self) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    @property
    def node_cpus(self) -> int:
        return max([1] + [int(n.get("Resources", {}).get("CPU", 0)) for n in self._alive()])

    def _alive(self) -> list[dict[str, Any]]:
        return [n for n in self._ray.nodes() if n.get("Alive")]

    def check_nodes(self, ids: Sequence[str] | None = None) -> None:
        """Refuse the cluster if any node (every alive node, or those of `ids` not checked yet) reports other
        versions, sources or CPU dispatch than this machine."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        mine = node_report()
        nodes = [
            n
            for n in self._alive()
            if (ids is None or n["NodeID"] in ids) and n["NodeID"] not in self.checked
        ]
        refs = {
            n["NodeID"]: self._probe.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote()
            for n in nodes
        }
        for node_id, ref in refs.items():
            theirs, ip = self._ray.get(ref, timeout=PROBE_TIMEOUT)
            diff = report_difference(mine, theirs)
            if diff:
                raise MintError(
                    f"Ray node {ip} ({node_id[:12]}) differs from this machine: {'; '.join(diff[:4])}; "
                    "refusing a mixed cluster (its tasks would not give this machine's bytes)"
                )
            self.checked[node_id] = ip
        log.info("cluster: %d node(s) match this machine (mintbuild %s, source %s)", len(self.checked),
                 mine["mintbuild"], mine["mintbuild source"])  # fmt: skip

    def _check_memory(self, memory: int, label: str) -> None:
        """Refuse, before submitting, a request no node can grant (Ray would wait for such a node forever)."""
        most = max((n.get("Resources", {}).get("memory", 0) for n in self._alive()), default=0)
        if memory > most:
            raise MintError(
                f"{label}: a task needs {memory / 2**30:.2f} GB of memory but the largest Ray node offers "
                f"{most / 2**30:.2f} GB; add a larger node"
            )

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        resources: Resources | None = None,
        label: str = "tasks",
        progress: bool = True,
    ) -> list[R]:
        return self.submit(fn, items, resources, label, progress)()

    def submit(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        resources: Resources | None = None,
        label: str = "tasks",
        progress: bool = True,
    ) -> Callable[[], list[R]]:
        res = resources or Resources()
        opts: dict[str, Any] = {"num_cpus": res.cpus, "max_retries": self.retries, "retry_exceptions": False}
        if res.memory:
            self._check_memory(res.memory, label)
            opts["memory"] = int(res.memory)
        t0 = time.perf_counter()
        delay = float(os.environ.get(ENV_TEST_DELAY) or 0)
        refs = [self._remote.options(**opts).remote(fn, item, res.task_threads, delay) for item in items]
        return lambda: self._collect(refs, t0, res, label, progress)

    def _collect(self, refs: list[Any], t0: float, res: Resources, label: str, progress: bool) -> list[Any]:
        """The submitted tasks' results in input order, once all are done; their timings recorded."""
        from ray.exceptions import RayTaskError
        from tqdm import tqdm

        ray = self._ray
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        info: list[dict[str, Any]] = [{}] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), unit="task", desc=f"{label} (ray)", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        results[index[ref]], info[index[ref]] = ray.get(ref)
                    except RayTaskError as e:
                        # the task's own MintError keeps its one-line message; anything else is a bug
                        if isinstance(e.cause, MintError):
                            raise e.cause from None
                        raise
                    bar.update(1)
        wall = time.perf_counter() - t0
        self.check_nodes(sorted({i["node"] for i in info} - set(self.checked)))  # nodes that joined meanwhile
        record_timings(label, wall, info, res)
        return results


def timings_dir() -> Path:
    return Path(os.environ.get(ENV_TIMINGS) or DEFAULT_TIMINGS)


def record_timings(label: str, wall: float, info: list[dict[str, Any]], res: Resources) -> Path:
    """Write where and how long each task of one map ran to timings_dir()/<label>.json (atomically)."""
    from mintbuild.io import atomic_write_json

    path = timings_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    per_node: dict[str, int] = {}
    for i in info:
        per_node[i["ip"] + " " + i["node"][:12]] = per_node.get(i["ip"] + " " + i["node"][:12], 0) + 1
    atomic_write_json(path, {
        "label": label,
        "executor": "ray",
        "wall_seconds": round(wall, 3),
        "resources": {"cpus": res.cpus, "memory": res.memory, "threads": res.task_threads},
        "tasks_per_node": per_node,
        "tasks": [{"index": k, **i} for k, i in enumerate(info)],
    })  # fmt: skip
    log.info(
        "%s: %d tasks on %d node(s) in %.1f s (timings: %s)", label, len(info), len(per_node), wall, path
    )
    return path
