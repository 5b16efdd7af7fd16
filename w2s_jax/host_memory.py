"""Keep freed host memory in the process, so a CPU train step does not page-fault its buffers in on every call.

XLA:CPU allocates each call's temporary and output buffers with malloc. glibc serves every block over its mmap
threshold (32 MiB at most) from fresh anonymous pages and gives them back to the kernel on free, so each train step
touches its large buffers (the [tokens, vocab] logits and their gradient, the attention scores) for the first time
again: at bench-27m that is ~255,000 page faults and ~0.45 s of kernel time in a ~1.1 s step; SmolLM2-135M's float32
train step (batch 32 x 64) takes its temporaries as one 3.2 GB block, ~779,000 faults and 2-3 s of kernel time a
step (docs/BENCHMARKS.md). With one malloc arena, no mmap for large blocks and no trimming at all (a trim threshold
of -1: the largest positive one, INT_MAX, still gives back a free block over 2 GiB), freed blocks stay in the heap
and the next step reuses them. The cost: the process keeps its peak host memory until it exits, and threads that
allocate a lot at once share one arena (PyTorch's autocast slowed down with it). Whole train steps got faster on
average, but not in every run, so it is opt-in: `--config.host_malloc=retain`, `bench/throughput.py
--malloc=retain`.

The settings only take hold if made before XLA starts its threads (each thread would otherwise keep an arena of its
own), so entry points call `retain_freed_memory` first thing, before any device is touched.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NO_TRIM = -1  # mallopt takes an int: INT_MAX would still trim a free block over 2 GiB; -1 never trims


def _backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def retain_freed_memory(mode: str = "retain") -> bool:
    """Set glibc's malloc to keep freed memory (one arena, no mmap, no trim) when mode is "retain"; "default"
    leaves glibc as it is. Returns whether the settings were made: never off glibc, nor once jax's backend has
    started (too late: its threads already hold arenas of their own).
    """
    if mode not in ("retain", "default"):
        raise ValueError(f"host_malloc={mode!r}: expected 'retain' or 'default'")
    if mode == "default" or not sys.platform.startswith("linux") or _backend_started():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NO_TRIM)))
