"""Run NumPy's OpenBLAS single-threaded while a schedule is simulated.

The lab's products are small (tiles of a few hundred rows); with more than one BLAS thread they
gain nothing, and on a busy machine the spinning worker threads made a 1-second simulation take
15. This finds the OpenBLAS that NumPy loaded (as threadpoolctl does, without depending on it),
sets one thread for the duration, and restores the previous count. Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager

_NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads"))
_lock = threading.Lock()
_found = None


def _openblas():
    global _found
    if _found is None:
        _found = []
        try:
            import numpy  # noqa: F401  (loads its OpenBLAS)

            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
            for path in paths:
                lib = ctypes.CDLL(path)
                for get, set_ in _NAMES:
                    if hasattr(lib, get) and hasattr(lib, set_):
                        getattr(lib, set_).argtypes = [ctypes.c_int]
                        _found.append((getattr(lib, get), getattr(lib, set_)))
                        break
        except OSError:
            pass
    return _found


@contextmanager
def single_threaded_blas():
    with _lock:
        libs = _openblas()
        saved = [get() for get, _ in libs]
        for _, set_ in libs:
            set_(1)
    try:
        yield
    finally:
        with _lock:
            for (_, set_), n in zip(libs, saved):
                set_(n)
