"""mintbuild: model compression as a build.

Importing the package pins the numeric dispatch of torch, MKL, numpy and numba to AVX2 (mintbuild/dispatch.py)
before any of them loads, so that every stage writes the same bytes on any x86-64 CPU with AVX2.
"""

from mintbuild import dispatch

dispatch.pin()

__version__ = "0.1.0"
