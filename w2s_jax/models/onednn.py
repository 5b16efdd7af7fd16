"""bfloat16 and float32 matmuls on a CPU through oneDNN, called from XLA programs as an FFI custom call.

XLA:CPU's bfloat16 matmul runs at about half the speed of oneDNN's AMX kernels on a CPU that has them, and at
0.71-0.88x of its AVX512-BF16 kernels on an AMD EPYC; on an Intel Xeon, oneDNN's float32 kernels made SmolLM2's
float32 feature extraction 13-16% faster than XLA's (docs/BENCHMARKS.md). The projections are most of a LLaMA
forward pass.

When oneDNN's headers and library are installed (Debian/Ubuntu: `apt-get install libdnnl-dev`) and a C++ compiler
is on the PATH, the first projection builds `onednn_matmul.cc` into the asset cache (once per source and jax
version) and registers it with XLA. `models.llama` then sends its projections and the attention's batched matmuls
(scores and weighted values, forward and backward) to it when the program runs on a single CPU device. Everything
else keeps XLA's own dot: GPUs and TPUs, several devices (the custom call has no sharding rule, so a sharded program
would gather its operands), other dtypes, and machines without oneDNN or whose CPU it has no bfloat16 matmul for
(no AVX-512); one log line says why.

The result is XLA's up to the order of its float32 sums: float32 accumulation, then, for a bfloat16 result, one
rounding (tests/test_onednn.py).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

ENABLED = True  # False: XLA's dot everywhere (bench/memory.py, which compiles other backends' programs on a CPU)
TARGET = "w2s_onednn_matmul"
SOURCE = Path(__file__).with_name("onednn_matmul.cc")


def usable(x, out_dtype) -> bool:
    """Whether `x @ kernel` (x in the compute dtype) goes to oneDNN: bfloat16 in and bfloat16 or float32 out, or
    float32 in and out, on a process with one CPU device, with the kernel built."""
    return (ENABLED and x.dtype in (jnp.bfloat16, jnp.float32) and jnp.dtype(out_dtype) in (x.dtype, jnp.float32)
            and jax.default_backend() == "cpu" and jax.device_count() == 1 and _registered())


def matmul(a, b, out_dtype, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) for bfloat16 a and b in `out_dtype` (bfloat16 or float32), or for float32 a and b in float32;
    op transposes the last two axes of an operand when its flag is set (a stored [..., k, m], b stored
    [..., n, k]), without a copy. Leading axes are batch axes, the same in a and b."""
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"onednn.matmul: the batch axes differ: {a.shape[:-2]} and {b.shape[:-2]}")
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((*a.shape[:-2], m, n), out_dtype), vmap_method="sequential")
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


def _cache_dir() -> Path:
    from w2s_jax import assets  # the asset cache (~/.cache/w2s_jax or $W2S_ASSETS)
    return assets.cache_dir() / "kernels"


def build() -> Path:
    """Compile the handler (if this source and jax version have no build yet); its path. Raises RuntimeError with
    the compiler's first error line when it cannot be built."""
    digest = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"onednn_matmul-{digest}.so"
    if lib.exists():
        return lib
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on the PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-I", jax.ffi.include_dir(),
               "-ldnnl", "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"building {SOURCE.name} failed: {errors[0] if errors else done.returncode}")
        os.replace(built, lib)  # atomic: processes building at once each write their own file first
    return lib


@functools.cache
def _registered() -> bool:
    """Build, load and register the handler once per process; False (logged once) when oneDNN is not there."""
    try:
        path = build()
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError) as e:
        log.info("oneDNN matmuls unavailable (%s); the projections use XLA's dot", e)
        return False
    if not lib.OnednnSupported():
        log.info("oneDNN has no bfloat16 matmul for this CPU (it needs AVX-512); the projections use XLA's dot")
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.OnednnMatmul), platform="cpu")
    log.info("projections on a single CPU device use oneDNN (%s)", path)
    return True
