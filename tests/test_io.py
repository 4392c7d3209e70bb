"""Atomic writes: a writer killed outright (SIGKILL) leaves its temporary sibling behind, and the next atomic
write to the same destination removes it; a real `mintbuild pack` killed mid-run, then rerun, leaves a valid
packed folder and no temporary folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mintbuild.artifacts.pack import verify_manifest
from mintbuild.config import Params, TargetConfig, as_dict
from mintbuild.io import atomic_dir, atomic_write_text, remove_stale_temporaries
from tests.synth import published_solver, tiny_llama


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getpid()
    stale = [
        tmp_path / f".out.{dead}.abc123_x.tmp",  # a killed atomic_dir's folder
        tmp_path / ".out.q7ryfleh.tmp",  # the earlier naming, without a PID
        tmp_path / f".out.old-{dead}",  # the previous output, moved aside just before the rename
    ]
    kept = [
        tmp_path / f".out.{alive}.zz9.tmp",  # a running writer's
        tmp_path / f".out.json.{dead}.abc.tmp",  # another destination's (out.json)
        tmp_path / "out.keep",
    ]
    for p in stale + kept:
        p.mkdir()
        (p / "part").write_text("x")
    (tmp_path / f".out.{dead}.file1234.tmp").write_text("half a file")  # atomic_write_bytes' file
    stale.append(tmp_path / f".out.{dead}.file1234.tmp")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("done")
    assert all(not p.exists() for p in stale), [p.name for p in stale if p.exists()]
    assert all(p.exists() for p in kept)
    assert (tmp_path / "out" / "a").read_text() == "done"
    (tmp_path / f".f.txt.{dead}.k3.tmp").write_text("half")
    atomic_write_text(tmp_path / "f.txt", "whole")
    assert sorted(p.name for p in tmp_path.glob(".f.txt*")) == []
    assert remove_stale_temporaries(tmp_path / "missing" / "x") == []


@pytest.fixture(scope="module")
def pack_params(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml for packing one target of a tiny model (profiled and allocated here), with an empty cache
    so that the packer quantizes every tensor: long enough to be killed mid-write."""
    from mintbuild.artifacts.model import resolve_weights_dir
    from mintbuild.config import ProfileConfig
    from mintbuild.stages.allocate import run as allocate_run
    from mintbuild.stages.model import import_model
    from mintbuild.stages.profile import run as profile_run

    root = tmp_path_factory.mktemp("kill")
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:100_000]
    src = tiny_llama(root / "src", text, hidden=512, layers=8)
    params = Params(targets={"t": TargetConfig(bits_per_weight=4.5)}, solver=published_solver())
    params.model.source, params.model.path, params.model.out = "local", str(src), str(root / "model")
    params.equalize.out = params.model.out
    import_model(params.model, root / "model")
    model = resolve_weights_dir(root / "model")
    profile_run(model, ProfileConfig(), root / "profile", progress=False)
    params.pack.rounding = "rtn"
    params.allocate_out, params.pack_out = str(root / "allocate"), str(root / "pack")
    allocate_run(params, None, root / "profile", root / "allocate", model)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(as_dict(params), sort_keys=True))
    return path


def _pack(params: Path, cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mintbuild.cli", "pack", "--params", str(params), "--no-progress",
           "--cache", str(cache)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.e2e
def test_pack_killed_mid_write_leaves_nothing_once_rerun(pack_params: Path, tmp_path: Path) -> None:
    out_root = Path(yaml.safe_load(pack_params.read_text())["pack_out"])
    proc = _pack(pack_params, tmp_path / "cache")
    deadline = time.monotonic() + 600
    temporaries: list[Path] = []
    while not temporaries and proc.poll() is None and time.monotonic() < deadline:
        temporaries = list(out_root.glob(".t.*.tmp")) if out_root.is_dir() else []
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert temporaries, f"pack finished before its temporary folder was seen: {proc.stdout.read()[-2000:]!r}"
    assert proc.returncode == -signal.SIGKILL
    # what a kill -9 leaves: the hidden temporary folder, and no output the next stage could take as done
    assert list(out_root.glob(".t.*.tmp")) and not (out_root / "t").exists()
    rerun = _pack(pack_params, tmp_path / "cache")
    log = rerun.communicate(timeout=900)[0].decode(errors="replace")
    assert rerun.returncode == 0, log[-2000:]
    assert sorted(p.name for p in out_root.iterdir() if p.name.startswith(".t.")) == []
    manifest = verify_manifest(out_root / "t")  # every file the manifest lists, checked by size and sha256
    assert manifest["files"]
