"""The oneDNN matmul in bfloat16 and float32 (models/onednn.py): XLA's result up to float32 summation order, and
taken by the model's projections exactly where intended. Skipped where oneDNN is not installed (`apt-get install
libdnnl-dev`)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.models import llama, onednn

pytestmark = pytest.mark.skipif(not onednn._registered(), reason="oneDNN (libdnnl-dev) or a C++ compiler missing")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("batch, shape", [((), (37, 53, 29)), ((), (64, 1536, 192)), ((2, 3), (19, 64, 33))])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matmul_is_xla_dot(batch, shape, trans_a, trans_b, dtype):
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal(batch + ((k, m) if trans_a else (m, k))), dtype)
    b = jnp.asarray(rng.standard_normal(batch + ((n, k) if trans_b else (k, n))), dtype)
    op = lambda x, flag: jnp.swapaxes(x, -1, -2) if flag else x
    exact = jnp.matmul(op(a, trans_a), op(b, trans_b), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
    y32 = jax.jit(lambda a, b: onednn.matmul(a, b, jnp.float32, trans_a, trans_b))(a, b)
    assert y32.dtype == jnp.float32 and y32.shape == batch + (m, n)
    order = 1e-6 * float(jnp.abs(exact).max())  # what float32 summation in another order can change
    np.testing.assert_allclose(y32, exact, rtol=0, atol=order)
    if dtype == jnp.float32:
        return  # float32 operands give a float32 result only
    y16 = jax.jit(lambda a, b: onednn.matmul(a, b, jnp.bfloat16, trans_a, trans_b))(a, b)
    assert y16.dtype == jnp.bfloat16
    off = np.asarray(y16, np.float32) != np.asarray(exact.astype(jnp.bfloat16), np.float32)
    assert off.mean() < 1e-3  # one rounding of the float32 sum: a tie broken the other way at most, rarely
    # Half a bfloat16 ulp of the sum, and the summation order's error where a sum nearly cancels (the rounding
    # then scales that error up relative to the small result).
    np.testing.assert_allclose(np.asarray(y16, np.float32), exact, rtol=2 ** -8, atol=order)


def test_mismatched_batch_axes_are_an_error():
    a, b = jnp.ones((2, 4, 8), jnp.bfloat16), jnp.ones((3, 8, 4), jnp.bfloat16)
    with pytest.raises(Exception, match="the batch axes differ"):
        jax.jit(lambda a, b: onednn.matmul(a, b, jnp.float32))(a, b).block_until_ready()


def test_float32_operands_need_a_float32_result():
    a = jnp.ones((4, 8), jnp.float32)
    with pytest.raises(Exception, match="float32 operands need a float32 result"):
        jax.jit(lambda a: onednn.matmul(a, a.T, jnp.bfloat16))(a).block_until_ready()


def test_not_taken_on_several_devices():
    assert jax.device_count() > 1  # this test session has 8 devices
    for dtype in (jnp.bfloat16, jnp.float32):
        assert not onednn.usable(jnp.ones((4, 8), dtype), dtype)


ONE_DEVICE = """
import logging; logging.basicConfig(level=logging.INFO)
import json, sys, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from w2s_jax.models import llama, onednn
cfg = llama.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype=sys.argv[1])
model = llama.LlamaForCausalLM(cfg)
ids = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)
params = nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])
loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids))[..., 3])
out = {}
for enabled in (True, False):
    onednn.ENABLED = enabled
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)  # a new function: traced again
    hlo = lowered.as_text()
    value, grads = lowered.compile()(params)
    out[str(enabled)] = {"calls": hlo.count(onednn.TARGET), "loss": float(value),
                         "grads": [np.asarray(g, np.float32).ravel().tolist() for g in jax.tree.leaves(grads)]}
print(json.dumps(out))
"""


def _one_device(dtype="bfloat16", **env):
    """ONE_DEVICE's output ({"True": with oneDNN enabled, "False": without}) and log, in a 1-device process whose
    model computes in `dtype`."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", **env}
    done = subprocess.run([sys.executable, "-c", ONE_DEVICE, dtype], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("dtype, rel", [("bfloat16", 2e-2), ("float32", 1e-5)])
def test_the_model_takes_it_on_one_device_forward_and_backward(dtype, rel):
    out, _ = _one_device(dtype)
    on, off = out["True"], out["False"]
    # 7 projections a layer x 2 layers and the LM head: 15 in the forward, 30 in the backward (dx and d_kernel);
    # the attention's 2 batched matmuls a layer forward, 4 backward: 12
    assert (on["calls"], off["calls"]) == (15 * 3 + 2 * 6, 0)
    # bfloat16: its roundings placed differently; float32: the order of the sums
    assert on["loss"] == pytest.approx(off["loss"], rel=rel / 2)
    for g_on, g_off in zip(on["grads"], off["grads"]):
        g_on, g_off = np.array(g_on), np.array(g_off)
        assert np.linalg.norm(g_on - g_off) <= rel * np.linalg.norm(g_off)


def test_a_cpu_without_avx512_keeps_xlas_dot():
    """oneDNN has no bfloat16 matmul without AVX-512 (capped here with its own ISA switch): the handler is not
    registered, and a bfloat16 model runs on XLA's dot instead of failing in its first projection."""
    out, log = _one_device(DNNL_MAX_CPU_ISA="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    on, off = out["True"], out["False"]
    assert on["calls"] == 0 and np.isfinite(on["loss"]) and on == off
    assert "no bfloat16 matmul for this CPU" in log
