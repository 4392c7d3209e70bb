"""Does a fresh clone of this commit rebuild the committed dvc.lock, byte for byte? Clones HEAD into a temporary
folder, runs `dvc repro` there with every thread pool (torch/OpenMP, MKL, numba, BLAS) at `--threads`, and
compares every DVC out's hash with the committed dvc.lock (which `make build` wrote with the machine's default
thread count). Prints one line per out and exits 1 if any differs.

Usage: .venv/bin/python benchmarks/reproducible.py [--threads 1] [--keep DIR]
Needs a committed dvc.lock that is current for this commit (`dvc status` clean after `make build`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("reproducible")


def out_hashes(lock_text: str) -> dict[str, str]:
    lock = yaml.safe_load(lock_text)
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def rebuild(clone: Path, threads: int) -> float:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(clone)}  # fmt: skip
    env |= {
        v: str(threads)
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "--force"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="threads for every pool in the rebuild (default 1)")
    p.add_argument("--keep", help="build in this folder (kept) instead of a temporary one")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    committed = out_hashes(subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=ROOT, check=True,
                                          capture_output=True, text=True).stdout)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(args.keep) if args.keep else Path(tmp) / "clone"
        seconds = rebuild(clone, args.threads)
        rebuilt = out_hashes((clone / "dvc.lock").read_text())
    # DVC keeps the lock entries of foreach keys that dvc.yaml no longer has: those are not this commit's outs.
    stale = sorted(set(committed) - set(rebuilt))
    differ = [k for k in rebuilt if committed.get(k) != rebuilt[k]]
    for k in sorted(rebuilt):
        log.info("%-50s %s", k, "differs" if k in differ else "same")
    if stale:
        log.info(
            "ignored: %d committed entries of stages dvc.yaml no longer has (%s ...)", len(stale), stale[0]
        )
    log.info("%d of %d outs identical to the committed dvc.lock; rebuild with %d thread(s) took %.0f s",
             len(rebuilt) - len(differ), len(rebuilt), args.threads, seconds)  # fmt: skip
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
