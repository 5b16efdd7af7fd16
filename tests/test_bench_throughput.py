"""bench/throughput.py's timing: what fresh host memory costs a step (kernel time, page faults) is measured per call."""
import ctypes
import sys
import time

import pytest

from bench import throughput


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, getrusage's minor faults")
def test_median_times_counts_fresh_pages():
    # glibc maps a fresh 64 MiB block for every call and unmaps it on free: 16,384 pages faulted in per call; a
    # sleep touches none and uses no CPU
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def fresh_block():
        p = libc.malloc(64 << 20)
        ctypes.memset(p, 1, 64 << 20)
        libc.free(p)

    m = throughput.median_times({"block": fresh_block, "sleep": lambda: time.sleep(0.05)}, warmup=1, steps=3)
    assert m["block"]["minor_faults"] >= 16_384 and m["block"]["kernel_s"] > 0
    assert len(m["sleep"]["samples_s"]) == 3 and m["sleep"]["s"] == sorted(m["sleep"]["samples_s"])[1]
    assert m["sleep"]["minor_faults"] < 100 and m["sleep"]["cpu_s"] < 0.01 and m["sleep"]["s"] >= 0.05
