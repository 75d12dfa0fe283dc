"""Resource ceilings of one case, checked before anything is allocated.

Geometry and headers decide how much memory a case takes (rows x columns x frames, a NIfTI's
dims, a resampled grid's extent). A crafted 78-byte file can claim a terabyte, so every reader
and every resampling step asks `require_fits` first and refuses with `too_large`.
"""

from __future__ import annotations

import math

from pipeline.errors import RejectedCase

# 700 MiB: a 700-slice 512x512 CT as float32. Ingest's peak per worker is about twice this (the
# volume plus one working copy) plus the interpreter: inside 1.5 GiB (benchmarks/README.md).
DEFAULT_MAX_CASE_BYTES = 700 * 2**20


def require_fits(shape, itemsize: int, limit: int, what: str) -> int:
    """Bytes an array of `shape` x `itemsize` would take; `RejectedCase("too_large")` above `limit`."""
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise RejectedCase("bad_dimensions", f"{what} has a negative dimension")
    n_bytes = math.prod(dims) * int(itemsize)  # Python ints: no overflow for absurd headers
    if n_bytes > limit:
        raise RejectedCase("too_large", f"{what} would take {_gib(n_bytes)}, above ingest.max_case_bytes "
                           f"({_gib(limit)}); raise it for a larger scan, or check the header")
    return n_bytes


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 2**50 else f"{n:.2e} bytes"
