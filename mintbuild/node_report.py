"""What a node reports before it takes a task: mintbuild's version and source hash, Python's and the numeric
libraries' versions, the CPU's dispatch flags and the variables that force a dispatch; and how two reports
differ. Everything in it must be equal on every node for a task's bytes to be this machine's
(mintbuild.cluster refuses a node whose report differs). Reads package metadata and /proc/cpuinfo only."""

from __future__ import annotations

import hashlib
import os
import platform
import re
from functools import cache
from pathlib import Path

from mintbuild import __version__

#: TEST ONLY: a version string the node report gives instead of mintbuild's own, so that a test can start a
#: node that looks like another release and check that the cluster is refused. Never set it on a real node.
ENV_TEST_VERSION = "MINTBUILD_TEST_VERSION_OVERRIDE"
#: Libraries whose version can change a result's bits (mlx only where installed).
LIBRARIES = ("torch", "numpy", "numba", "llvmlite", "transformers", "gguf", "safetensors", "mlx")
#: /proc/cpuinfo flags that steer torch's, oneDNN's, MKL's, numpy's and numba's kernel dispatch.
DISPATCH_FLAGS = frozenset({
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "sve2",
})  # fmt: skip
#: Variables that force one dispatch (DESIGN.md section 2): a node that sets them differently computes other
#: bits even on the same CPU.
DISPATCH_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "NPY_DISABLE_CPU_FEATURES",
    "NUMBA_CPU_NAME",
)


@cache
def source_hash() -> str:
    """sha256 over the mintbuild package's .py files (relative path and bytes, in path order)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cpu_flags() -> list[str]:
    """The dispatch-relevant flags of this CPU (from /proc/cpuinfo; empty where it is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return sorted(set(m.group(1).split()) & DISPATCH_FLAGS) if m else []


def node_report() -> dict[str, str]:
    """What must be equal on every node for a task's bytes to be this machine's: mintbuild's version and
    source hash, Python's and the numeric libraries' versions, the CPU's dispatch flags and the variables that
    force a dispatch. Reads package metadata only (imports none of the libraries)."""
    from importlib.metadata import PackageNotFoundError, version

    report = {
        "mintbuild": os.environ.get(ENV_TEST_VERSION) or __version__,
        "mintbuild source": source_hash(),
        "python": platform.python_version(),
    }
    for lib in LIBRARIES:
        try:
            report[lib] = version(lib)
        except PackageNotFoundError:
            report[lib] = "absent"
    report["cpu flags"] = " ".join(cpu_flags())
    for var in DISPATCH_ENV:
        report[var] = os.environ.get(var, "")
    return report


def report_difference(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """Human-readable differences of a node's report from this machine's ('key theirs != mine')."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key, "absent"), theirs.get(key, "absent")
        if a == b:
            continue
        if key == "cpu flags":
            extra = sorted(set(b.split()) - set(a.split()))
            missing = sorted(set(a.split()) - set(b.split()))
            parts = ([f"has {' '.join(extra)}"] if extra else []) + (
                [f"lacks {' '.join(missing)}"] if missing else []
            )
            out.append(f"cpu flags: {'; '.join(parts)}")
        else:
            out.append(f"{key} {b or '(unset)'} != {a or '(unset)'}")
    return out


# ---------------------------------------------------------------- Ray
