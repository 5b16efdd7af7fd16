"""w2s_jax.host_memory: once applied, a freed large block is reused without page faults (glibc's default unmaps
it, so touching a new one faults in every page again), also one over 2 GiB (a SmolLM2 train step's temporaries)."""
import os
import subprocess
import sys

import pytest

from w2s_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate a block of argv[3] MiB, touch its last 64 MiB (the end that a trim gives back first) and free it, twice;
# print whether the settings were applied and the minor page faults of the second round.
FAULTS = """
import ctypes, resource, sys
from w2s_jax import host_memory
if sys.argv[2] == "jax_started":
    import jax
    jax.devices()
applied = host_memory.retain_freed_memory(sys.argv[1])
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
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode, when="first", mib=64):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode, when, str(mib)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout.split()
    return out[-2] == "True", int(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _faults("retain")
    assert applied and faults < 100
    applied, faults = _faults("default")  # 64 MiB of 4 KiB pages fault in again
    assert not applied and faults > 10_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_block_over_2_gib_is_retained_too():
    # glibc trims a free top chunk at or over the trim threshold; a threshold of INT_MAX (mallopt takes an int) gave
    # back every block over 2 GiB on free, so only -1 (no trimming at all) keeps them
    applied, faults = _faults("retain", mib=2560)
    assert applied and faults < 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_not_applied_once_jax_has_started():
    applied, faults = _faults("retain", when="jax_started")
    assert not applied and faults > 10_000


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        host_memory.retain_freed_memory("sometimes")
