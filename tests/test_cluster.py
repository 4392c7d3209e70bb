"""The executor seam (mintbuild.cluster) on a real 2-node Ray cluster on loopback: the tiny model's DVC build
gives the same out hashes in process and on the cluster, its tasks ran on both nodes, a worker killed while it
holds a task is retried with the same bytes, a node reporting another mintbuild version is refused, and no
stage imports ray when no cluster is chosen.

The cluster is started and shut down by the module fixture (`ray.cluster_utils.Cluster`: a head and a worker
node, one CPU each, both at 127.0.0.2 so that every connection stays on loopback). Select with `-m cluster`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mintbuild.cluster import ENV_CLUSTER, ENV_TEST_DELAY, ENV_TIMINGS, batches
from mintbuild.node_report import ENV_TEST_VERSION, node_report, report_difference

from .dvcrepo import ENV, make_repo, out_hashes, ran, sh, tiny_params, write_text
from .synth import tiny_llama

pytestmark = pytest.mark.cluster
NODE_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the host's interface address
START_TIMEOUT = 120  # seconds the cluster may take to start before the fixture gives up


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def cluster():
    """A 2-node Ray cluster this module starts and shuts down (only its own processes)."""
    from ray.cluster_utils import Cluster

    with deadline(START_TIMEOUT, "starting the Ray cluster"):
        c = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "node_ip_address": NODE_IP, "include_dashboard": False},
        )
        c.add_node(num_cpus=1, node_ip_address=NODE_IP)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tiny model's profile, importance (Hessians), allocation, GPTQ pack of one target and baseline
    evaluation, built in process by `dvc repro` (equalization off: it runs in process either way and only adds
    time)."""
    root = tmp_path_factory.mktemp("cluster")
    text = write_text(root / "text.txt")
    model = tiny_llama(root / "tiny-model", text.read_text())
    params = tiny_params(model, text, {"a": {"bits_per_weight": 4.5}})
    params["equalize"]["method"] = "none"
    repo = make_repo(root / "repo", params)
    sh(repo, "dvc", "repro", "pack@a", "evaluate_baseline", env={ENV_CLUSTER: "local"})
    return repo


def ray_env(cluster, tmp: Path | None, **extra: str) -> dict[str, str]:
    timings = {ENV_TIMINGS: str(tmp)} if tmp else {}
    return {ENV_CLUSTER: "ray", "RAY_ADDRESS": cluster.address, **timings, **extra}


def test_no_stage_imports_ray_without_a_cluster(tmp_path) -> None:
    """The default executor runs in process: a stage runs, every stage module imports, and ray is never
    imported (checked in a fresh interpreter)."""
    model = tiny_llama(tmp_path / "m", "the model fits the budget " * 50)
    code = f"""
import importlib, pkgutil, sys
import mintbuild.stages
from mintbuild.cli import main
from mintbuild.cluster import InProcess, executor
assert main(["profile", "--model", {str(model)!r}, "--out", {str(tmp_path / "p")!r}, "--no-progress"]) == 0
for m in pkgutil.iter_modules(mintbuild.stages.__path__):
    importlib.import_module("mintbuild.stages." + m.name)
assert isinstance(executor(), InProcess), executor()
assert "ray" not in sys.modules, sorted(k for k in sys.modules if k.startswith("ray"))
print("ok")
"""
    env = {k: v for k, v in ENV.items() if k not in (ENV_CLUSTER, "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_batches_cover_items_in_order() -> None:
    sizes = [5, 1, 1, 1, 100, 1, 1, 3]
    for parts in range(1, 10):
        got = batches(sizes, parts)
        assert [i for r in got for i in r] == list(range(len(sizes)))  # contiguous, in order, all of them
        assert len(got) == min(parts, len(sizes))
    assert batches([], 4) == []


def test_report_difference_names_what_differs() -> None:
    mine = node_report()
    theirs = {**mine, "mintbuild": "9.9.9", "cpu flags": mine["cpu flags"] + " amx_tile"}
    theirs.pop("torch")
    diff = report_difference(mine, theirs)
    assert f"mintbuild 9.9.9 != {mine['mintbuild']}" in diff
    assert f"torch absent != {mine['torch']}" in diff
    assert any(d.startswith("cpu flags: has amx_tile") for d in diff)
    assert report_difference(mine, dict(mine)) == []


def test_profile_on_the_cluster_has_the_same_out_hashes(cluster, repo) -> None:
    """`dvc repro -f -s profile` on the 2-node cluster: every DVC out hash is the in-process one, and the
    timings file (artifacts/.cluster/, outside every out: DVC does not hash it) shows tensors measured on both
    nodes, one thread per task."""
    before = out_hashes(repo)
    assert ran(sh(repo, "dvc", "repro", "-f", "-s", "profile", env=ray_env(cluster, None))) == {"profile"}
    assert out_hashes(repo) == before
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", "profile", "evaluate_baseline")
    profile = json.loads((repo / "artifacts/.cluster/profile.json").read_text())
    assert len(profile["tasks_per_node"]) == 2, profile["tasks_per_node"]
    assert {t["threads"] for t in profile["tasks"]} == {1}


def test_importance_gains_on_the_cluster_have_the_same_out_hashes(cluster, repo, tmp_path) -> None:
    """`dvc repro -f -s importance` on the cluster: the walk stays here, each tensor's GPTQ gain at each option is
    a cluster task (reading the spilled Hessians and the one factor); importance.json, the Hessians and every
    other out hash are the in-process ones, and the tasks ran on both nodes."""
    before = out_hashes(repo)
    log = sh(repo, "dvc", "repro", "-f", "-s", "importance", env=ray_env(cluster, tmp_path))
    assert ran(log) == {"importance"}
    assert out_hashes(repo) == before
    tasks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("gains_*.json"))]
    assert tasks, sorted(p.name for p in tmp_path.iterdir())
    assert len({node for t in tasks for node in t["tasks_per_node"]}) == 2  # both nodes measured gains
    assert {task["threads"] for t in tasks for task in t["tasks"]} == {1}


def test_pack_gptq_on_the_cluster_has_the_same_out_hashes(cluster, repo, tmp_path) -> None:
    """`dvc repro -f -s pack@a` on the cluster with an empty pack cache: every GPTQ tensor is rounded by a
    cluster task into the cache, the unchanged writer reads them all back as hits, and the packed folder's hash
    is the in-process one."""
    before = out_hashes(repo)
    env = ray_env(cluster, tmp_path, MINTBUILD_CACHE=str(tmp_path / "cache"))
    log = sh(repo, "dvc", "repro", "-f", "-s", "pack@a", env=env)
    assert ran(log) == {"pack@a"}
    assert out_hashes(repo) == before
    timings = json.loads((tmp_path / "pack_a.json").read_text())
    hits = re.search(r"cache (\d+) hits / (\d+) misses", log)
    # every GPTQ tensor was a cluster task and a cache hit for the writer (misses: round-to-nearest tensors)
    assert hits and int(hits.group(1)) == len(timings["tasks"]) > 0, log[-2000:]


def _worker_running_a_task(cluster) -> int | None:
    """pid of a Ray worker of this cluster that is executing a task now (Ray titles it ray::_run_task)."""
    import psutil
    from ray._private import ray_constants

    for node in [cluster.head_node, *cluster.worker_nodes]:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for p in psutil.Process(raylet).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.cmdline() and p.cmdline()[0].startswith("ray::_run_task"):
                    return p.pid
    return None


def test_evaluate_on_the_cluster_survives_a_killed_worker(cluster, repo, tmp_path) -> None:
    """`dvc repro -f -s evaluate_baseline` on the cluster, one window per task, and SIGKILL to a worker while
    it holds a window: Ray reruns that task on another worker, and every DVC out hash is the in-process one."""
    before = out_hashes(repo)
    env = {**ENV, **ray_env(cluster, tmp_path, **{ENV_TEST_DELAY: "3"})}
    cmd = ["dvc", "repro", "-f", "-s", "evaluate_baseline"]
    driver = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed = None
    try:
        t0 = time.monotonic()
        while killed is None and driver.poll() is None and time.monotonic() - t0 < 90:
            killed = _worker_running_a_task(cluster)
            time.sleep(0.05)
        assert killed is not None, "no worker picked up a task"
        os.kill(killed, signal.SIGKILL)
        _, stderr = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr[-3000:]
    assert out_hashes(repo) == before
    timings = json.loads(next(tmp_path.glob("evaluate*.json")).read_text())
    assert len(timings["tasks"]) == 2  # one task per core, each with one of the 2 windows
    assert killed not in {t["pid"] for t in timings["tasks"]}  # the killed worker returned nothing


def test_a_node_with_another_version_is_refused(cluster, repo, tmp_path) -> None:
    """A third node whose report gives another mintbuild version: the stage refuses before any work, with one
    line naming the node and the difference."""
    from mintbuild import __version__

    node = cluster.add_node(num_cpus=1, node_ip_address=NODE_IP, env_vars={ENV_TEST_VERSION: "9.9.9-other"})
    try:
        cmd = ["mintbuild", "profile", "--cluster", "ray", "--out", str(tmp_path / "p"), "--no-progress"]
        env = {**ENV, "RAY_ADDRESS": cluster.address, ENV_TIMINGS: str(tmp_path)}
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    finally:
        cluster.remove_node(node)
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mintbuild profile: error: Ray node {NODE_IP} (")
    assert f"mintbuild 9.9.9-other != {__version__}" in line and "mixed cluster" in line
    assert not (tmp_path / "p").exists() and not (tmp_path / "profile.json").exists()
