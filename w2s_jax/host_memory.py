"""glibc's malloc for host buffers: keep freed memory, or back large blocks with huge pages, so a CPU train step does
not page-fault its buffers in, 4 KiB at a time, on every call.

XLA:CPU allocates each call's temporary and output buffers with malloc. glibc serves every block over its mmap
threshold (32 MiB at most) from fresh anonymous pages and gives them back to the kernel on free, so each train step
touches its large buffers (the [tokens, vocab] logits and their gradient, the attention scores) for the first time
again: at bench-27m that is ~255,000 page faults and ~0.45 s of kernel time in a ~1.1 s step; SmolLM2-135M's float32
train step (batch 32 x 64) takes its temporaries as one 3.2 GB block, ~779,000 faults and 2-3 s of kernel time a
step (docs/BENCHMARKS.md). Two remedies (`--config.host_malloc`, default "huge_pages"; the benchmarks' `--malloc`,
default "default"):

* "retain": one malloc arena, no mmap for large blocks and no trimming at all (a trim threshold of -1: the largest
  positive one, INT_MAX, still gives back a free block over 2 GiB), so freed blocks stay in the heap and the next step
  reuses them: no faults. The cost: the process keeps its peak host memory until it exits, and threads that allocate
  a lot at once share one arena (PyTorch's autocast slowed down with it). The settings only take hold if made before
  XLA starts its threads (each would otherwise keep an arena of its own), so entry points apply them first thing.
* "huge_pages": glibc's tunable `glibc.malloc.hugetlb=1` has malloc ask the kernel for transparent huge pages
  (madvise) for what it maps, so a fresh block faults in 2 MiB at a time instead of 4 KiB (SmolLM2's step: 778,659
  faults -> ~2,200; docs/BENCHMARKS.md), and memory is still given back on free. glibc reads its tunables once, at
  start, so the process restarts itself (the same interpreter and arguments) with the tunable in GLIBC_TUNABLES. It
  needs glibc >= 2.35 and the kernel's THP mode "madvise" (with "always" the kernel decides alone; with "never"
  there are none).
"""
from __future__ import annotations

import ctypes
import os
import re
import sys

MODES = ("default", "retain", "huge_pages")
IN_FORCE = {"default": "glibc default", "retain": "freed memory retained", "huge_pages": "huge pages"}
# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NO_TRIM = -1  # mallopt takes an int: INT_MAX would still trim a free block over 2 GiB; -1 never trims
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def set_host_malloc(mode: str) -> str:
    """Apply a `host_malloc` mode (see the module docstring) and return what is in force: IN_FORCE[mode], or
    "glibc default" where the mode cannot be applied. "huge_pages" may restart the process, so call this from a
    program's entry point, before jax (or torch) starts.
    """
    if mode not in MODES:
        raise ValueError(f"host_malloc={mode!r}: expected one of {', '.join(map(repr, MODES))}")
    applied = {"default": lambda: True, "retain": retain_freed_memory, "huge_pages": use_huge_pages}[mode]()
    return IN_FORCE[mode] if applied else IN_FORCE["default"]


def _backend_started() -> bool:
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    return xla_bridge is not None and xla_bridge.backends_are_initialized()


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (one arena, no mmap, no trim). Returns whether the settings were made:
    never off glibc, nor once jax's backend has started (too late: its threads already hold arenas of their own).
    """
    if not sys.platform.startswith("linux") or _backend_started():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NO_TRIM)))


def thp_mode(path: str = THP_ENABLED) -> str:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"; "" where unknown)."""
    try:
        with open(path) as f:
            found = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return ""
    return found.group(1) if found else ""


def glibc_version() -> tuple[int, ...]:
    """(2, 36) for glibc 2.36; () off glibc."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return ()
    found = re.fullmatch(r"glibc (\d+)\.(\d+).*", name)
    return tuple(int(g) for g in found.groups()) if found else ()


def with_huge_pages(environ: dict) -> dict:
    """A copy of environ whose GLIBC_TUNABLES asks for huge pages (other tunables kept)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb=")]
    return {**environ, "GLIBC_TUNABLES": ":".join(tunables + [HUGE_PAGES_TUNABLE])}


def huge_pages_unavailable() -> str:
    """Why glibc's malloc cannot ask for transparent huge pages here; "" where it can."""
    if glibc_version() < (2, 35):
        return "it needs glibc 2.35 or later"
    if thp_mode() != "madvise":
        return f"the kernel's transparent huge page mode is {thp_mode() or 'unknown'!r}, not 'madvise'"
    return ""


def use_huge_pages() -> bool:
    """Have glibc's malloc back what it maps with transparent huge pages: True once this process runs so; otherwise
    it restarts itself with the tunable set (and does not return), or returns False where it cannot help
    (`huge_pages_unavailable`)."""
    if huge_pages_unavailable():
        return False
    if HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return True
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_huge_pages(os.environ))
