"""Keep freed heap memory for reuse (glibc's ``M_TRIM_THRESHOLD``), for the particle E-steps.

XLA's CPU runtime takes its buffers from glibc's ``malloc``. With glibc's default, dynamic
trim threshold, the large blocks of a particle smoother (an FFBSm chunk is ``B x N``
values, 8 MB at N = 1000) are handed back to the operating system when freed and faulted
in again when the next call allocates them. Measured on the tanh-RNN particle E-step
(T = 1000, dx = 2, N = 1000, float64, 2-core CPU, 9 calls each):

* glibc default: 1.65-1.75 s in some calls, 2.14-2.58 s in others (median 2.25 s);
* ``M_TRIM_THRESHOLD`` = 1 GiB: 1.65-1.69 s in every call (median 1.66 s).

It is a setting of the whole process, so the library never makes it on its own: call
``ppl_dyn.keep_freed_memory()`` once in a program that runs particle E-steps; the
command line (``ppl-dyn``) and the benchmark scripts do. It sets the threshold once per
process, only with glibc on Linux. The cost: up to 1 GiB of freed memory at the top of
the heap stays mapped to the process instead of going back to the system (later
allocations reuse it). The environment variable ``PPL_DYN_KEEP_FREED_MEMORY=0`` turns the
call into a no-op (as does glibc's own ``MALLOC_TRIM_THRESHOLD_``, which this module then
leaves alone).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number
TRIM_THRESHOLD = 2**30  # bytes

_state = {"done": False, "applied": False}


def keep_freed_memory() -> bool:
    """Raise glibc's ``M_TRIM_THRESHOLD`` to 1 GiB (once per process). Returns whether
    this process runs with the raised threshold set by this function."""
    if _state["done"]:
        return _state["applied"]
    _state["done"] = True
    if (
        os.environ.get("PPL_DYN_KEEP_FREED_MEMORY", "1") == "0"
        or "MALLOC_TRIM_THRESHOLD_" in os.environ
        or not sys.platform.startswith("linux")
    ):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (not musl)
            return False
        ok = libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
    _state["applied"] = bool(ok)
    return _state["applied"]
