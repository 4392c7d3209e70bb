"""One numeric dispatch on every x86-64 CPU with AVX2: what makes a build's bytes independent of the machine.

torch (ATen's vectorised kernels, oneDNN), MKL, numpy (and its OpenBLAS) and numba each choose kernels by the CPU's instruction
set at run time, so the same float computed on an AVX-512 machine and on an AVX2 one can differ in its last
bits. Setting the variables below before those libraries load forces the AVX2 kernels everywhere; mintbuild's
package __init__ calls `pin()` on import, so every stage (`mintbuild <verb>`) runs pinned.

Each variable is set with `os.environ.setdefault`: a value the user exported wins. `MINTBUILD_DISPATCH=native`
leaves them all alone (the libraries' own choice; what the reproducibility test compares against).

numpy 2.x (the lock pins 2.4): NPY_DISABLE_CPU_FEATURES takes the names of *dispatch targets* (see
`numpy._core._multiarray_umath.__cpu_dispatch__`: X86_V3, X86_V4, AVX512_ICL, AVX512_SPR on x86-64). Naming a
target the CPU lacks is silently accepted; naming a feature that is not a dispatch target (e.g. AVX512F) only
prints a warning. X86_V3 (AVX2, FMA3) stays on.
"""

from __future__ import annotations

import os

#: The dispatch every stage runs with unless the user sets a variable himself.
AVX2: dict[str, str] = {
    # ATen's CPU kernels: the AVX2 build of each vectorised kernel (not AVX-512)
    "ATEN_CPU_CAPABILITY": "avx2",
    # oneDNN (torch's convolutions and some matmuls): no instruction set beyond AVX2
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # MKL's conditional numerical reproducibility: the AVX2 code path, whatever the CPU
    "MKL_CBWR": "AVX2",
    # numpy's AVX-512 dispatch targets (numpy 2.x names)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    # numba compiles for Haswell (AVX2, FMA) instead of the host CPU
    "NUMBA_CPU_NAME": "haswell",
    # OpenBLAS (numpy's and scipy's BLAS/LAPACK) picks its kernels by cpuid too: the Haswell (AVX2) ones
    "OPENBLAS_CORETYPE": "Haswell",
    # MKL's reproducibility for a given thread count holds only if it never lowers the count itself
    # (reproducible.torch_threads: GPTQ's factor always runs on two threads)
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}

#: Set to "native" to keep the libraries' own dispatch.
SWITCH = "MINTBUILD_DISPATCH"


def pin(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the AVX2 dispatch variables that are not set yet (unless MINTBUILD_DISPATCH=native); return the
    values now in force. Effective only before torch, numpy and numba are imported."""
    env = os.environ if environ is None else environ
    if env.get(SWITCH, "").lower() == "native":
        return {k: env[k] for k in AVX2 if k in env}
    for key, value in AVX2.items():
        env.setdefault(key, value)
    return {k: env[k] for k in AVX2}
