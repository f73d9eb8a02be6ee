"""One BLAS thread for numpy in the program's processes.

The analytic predictor's matrix products are small (a few position bins by a few thousand
map positions), and a multi-threaded OpenBLAS spends more on waking and spinning its threads
than it saves. A fresh process's first prediction of the Llama-3-8B preset on this machine
class (2 cores, other work running; ``python benchmarks/blas_threads.py --repeats 3``): 938 ms
of CPU with numpy's default 2 BLAS threads, 491 ms with one (wall 1995 → 1437 ms); the
window's launch with that preset (``unitscale-explorer --screenshot``) 21–27 s → 15–17 s of
user CPU. torch keeps its own threads (its OpenMP/MKL pools are not numpy's BLAS), so
measurement and training are unaffected.

The entry points (``unitscale`` and ``unitscale-explorer``) call :func:`use_one_blas_thread`;
a library user who imports ``unitscale_core`` keeps numpy as it is unless they call it too
(or set ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import os

#: Set to 0 (or any other count) to keep numpy's BLAS threads as they are.
ENV = "UNITSCALE_BLAS_THREADS"


def use_one_blas_thread() -> int | None:
    """Limit every BLAS library numpy loaded (OpenBLAS, MKL, BLIS, Accelerate: found by
    ``threadpoolctl``) to one thread, or to ``$UNITSCALE_BLAS_THREADS`` threads when that is a
    positive whole number (``0``: leave them). Returns the limit applied (None: none)."""
    raw = os.environ.get(ENV, "1").strip()
    limit = int(raw) if raw.isdigit() else 1
    if limit == 0:
        return None
    import numpy  # noqa: F401  (threadpoolctl limits the libraries already loaded)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=limit, user_api="blas")
    return limit


def blas_thread_counts() -> set[int]:
    """The thread counts of the BLAS libraries numpy loaded, as ``threadpoolctl`` sees them
    (what :func:`use_one_blas_thread` set, or the libraries' own defaults)."""
    import numpy  # noqa: F401  (the libraries are found once loaded)
    from threadpoolctl import threadpool_info

    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

