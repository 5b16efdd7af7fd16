"""w2s_jax.host_memory: with "retain" a freed large block is reused without page faults (glibc's default unmaps
it, so touching a new one faults in every page again), also one over 2 GiB (a SmolLM2 train step's temporaries);
with "huge_pages" the process restarts itself under glibc's tunable and a fresh block faults in 2 MiB at a time."""
import json
import os
import subprocess
import sys

import pytest

from w2s_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
HUGE_PAGES = pytest.mark.skipif(host_memory.thp_mode() != "madvise" or host_memory.glibc_version() < (2, 35),
                                reason="glibc.malloc.hugetlb needs glibc >= 2.35 and the kernel's THP mode 'madvise'")

# Allocate a block of argv[3] MiB, touch its last 64 MiB (the end that a trim gives back first) and free it, twice;
# print what is in force, GLIBC_TUNABLES and the minor page faults of the second round.
FAULTS = """
import ctypes, json, os, resource, sys
from w2s_jax import host_memory
if sys.argv[2] == "jax_started":
    import jax
    jax.devices()
in_force = host_memory.set_host_malloc(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    n, t = int(sys.argv[3]) * 2 ** 20, 64 * 2 ** 20
    p = libc.malloc(n)
    ctypes.memset(p + n - t, 1, t)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([in_force, os.environ.get("GLIBC_TUNABLES"), faults]))
"""


def _faults(mode, when="first", mib=64, tunables=None):
    """(what is in force, GLIBC_TUNABLES at the end, page faults of touching a fresh block after one was freed)"""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", **({"GLIBC_TUNABLES": tunables} if tunables else {}))
    out = subprocess.run([sys.executable, "-c", FAULTS, mode, when, str(mib)], cwd=ROOT, capture_output=True, text=True,
                         env=env, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


@GLIBC
def test_retained_memory_is_reused_without_page_faults():
    in_force, _, faults = _faults("retain")
    assert in_force == "freed memory retained" and faults < 100
    in_force, _, faults = _faults("default")  # 64 MiB of 4 KiB pages fault in again
    assert in_force == "glibc default" and faults > 10_000


@GLIBC
def test_a_block_over_2_gib_is_retained_too():
    # glibc trims a free top chunk at or over the trim threshold; a threshold of INT_MAX (mallopt takes an int) gave
    # back every block over 2 GiB on free, so only -1 (no trimming at all) keeps them
    in_force, _, faults = _faults("retain", mib=2560)
    assert in_force == "freed memory retained" and faults < 100


@GLIBC
def test_not_applied_once_jax_has_started():
    in_force, _, faults = _faults("retain", when="jax_started")
    assert in_force == "glibc default" and faults > 10_000


@HUGE_PAGES
def test_huge_pages_restart_the_process_and_fault_in_2_mib_at_a_time():
    # the restarted process keeps the caller's other tunables; 64 MiB is 16,384 pages of 4 KiB, 32 of 2 MiB (the
    # kernel may fall back to small pages for a few, e.g. at the block's unaligned ends)
    in_force, tunables, faults = _faults("huge_pages", tunables="glibc.malloc.perturb=0")
    assert in_force == "huge pages" and tunables == "glibc.malloc.perturb=0:glibc.malloc.hugetlb=1"
    assert faults < 2_000


@GLIBC
def test_huge_pages_not_applied_where_the_kernel_has_none(monkeypatch):
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "never")
    assert host_memory.set_host_malloc("huge_pages") == "glibc default"  # and no restart: we are still here


def test_thp_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) == ""


def test_with_huge_pages_keeps_other_tunables_and_replaces_its_own():
    env = host_memory.with_huge_pages({"PATH": "/bin",
                                       "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=0"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"}
    assert host_memory.with_huge_pages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'sometimes': expected one of 'default', 'retain', 'huge_pages'"):
        host_memory.set_host_malloc("sometimes")
