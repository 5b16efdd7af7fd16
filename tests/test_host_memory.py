"""w2s_jax.host_memory: once applied, a freed large block is reused without page faults (glibc's default unmaps
it, so touching a new one faults in every page again)."""
import os
import subprocess
import sys

import pytest

from w2s_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free a 64 MiB block twice; print whether the settings were applied and the minor page faults
# of the second round.
FAULTS = """
import ctypes, resource, sys
from w2s_jax import host_memory
if sys.argv[2] == "jax_started":
    import jax
    jax.devices()
applied = host_memory.retain_freed_memory(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    n = 64 * 2 ** 20
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode, when="first"):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode, when], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True).stdout.split()
    return out[-2] == "True", int(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retained_memory_is_reused_without_page_faults():
    applied, faults = _faults("retain")
    assert applied and faults < 100
    applied, faults = _faults("default")  # 64 MiB of 4 KiB pages fault in again
    assert not applied and faults > 10_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_not_applied_once_jax_has_started():
    applied, faults = _faults("retain", when="jax_started")
    assert not applied and faults > 10_000


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        host_memory.retain_freed_memory("sometimes")
