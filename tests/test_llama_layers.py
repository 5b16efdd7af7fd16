"""Pieces of the Flax LLaMA on their own: the rotary tables, RMSNorm and the SwiGLU product in mixed precision."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from w2s_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)


def test_rope_table_lookup_equals_the_direct_formula():
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(3, 10)))
    cos, sin = llama.rope_cos_sin(CFG, positions, 10)
    freqs = positions[..., None].astype(jnp.float32) * llama.rope_inv_freq(CFG)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    np.testing.assert_allclose(cos, jnp.cos(emb), atol=1e-6)
    np.testing.assert_allclose(sin, jnp.sin(emb), atol=1e-6)
    # No positions: 0..L-1 for every row, L may exceed max_position_embeddings.
    default = llama.rope_cos_sin(CFG, None, 50)
    explicit = llama.rope_cos_sin(CFG, jnp.arange(50)[None], 50)
    np.testing.assert_array_equal(default[0], explicit[0])
    np.testing.assert_array_equal(default[1], explicit[1])


@pytest.mark.parametrize("with_positions", [False, True])
def test_rotary_tables_are_computed_once_per_step(with_positions):
    """XLA fuses an element-wise sin/cos into every consumer: 4 per layer (q and k, forward and backward) when they
    are computed in place. The compiled gradient must hold one of each, whatever the number of layers."""
    cfg = CFG.replace(dtype="bfloat16")
    model = llama.LlamaForCausalLM(cfg)
    ids = jnp.zeros((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16)) if with_positions else None
    params = nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])

    def loss(p):
        logits = model.apply({"params": p}, ids, positions=positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert hlo.count(" sine(") == 1 and hlo.count(" cosine(") == 1


def test_bfloat16_rmsnorm_scale_gradient_is_summed_in_float32():
    """The scale's gradient sums over all 4,096 tokens; a bfloat16 product would sum it in bfloat16 (2.3% error
    here, against 0.25% with the float32 product)."""
    x = jax.random.normal(jax.random.key(0), (8, 512, 64))
    w = jax.random.normal(jax.random.key(1), (8, 512, 64))

    def scale_grad(dtype):
        norm = llama.RMSNorm(1e-6, dtype, "float32")
        params = {"params": {"scale": 1.0 + 0.3 * jax.random.normal(jax.random.key(2), (64,))}}
        f = lambda p: jnp.sum(norm.apply(p, x.astype(dtype)).astype(jnp.float32) * w)
        return jax.grad(f)(params)["params"]["scale"]

    exact, mixed = scale_grad("float32"), scale_grad("bfloat16")
    assert mixed.dtype == jnp.float32
    assert np.linalg.norm(mixed - exact) / np.linalg.norm(exact) < 0.005


def test_cpu_layout_pins_can_be_turned_off(monkeypatch):
    """On CPU, 16-bit matmul operands are pinned row-major by an optimization barrier; bench/memory.py turns the
    pins off to plan the memory of an accelerator's program, which has none."""
    pinned = lambda: "optimization_barrier" in str(jax.make_jaxpr(lambda x: llama._row_major(x))(
        jnp.ones((4, 8), jnp.bfloat16)))  # a new function each time: make_jaxpr caches traces by function
    assert pinned()
    monkeypatch.setattr(llama, "CPU_LAYOUT_PINS", False)
    assert not pinned()


def _swiglu_formula(gate, up):
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_value_and_gradients_equal_autodiff(dtype):
    rng = np.random.default_rng(0)
    gate, up, weight = (jnp.asarray(rng.normal(size=(6, 40)) * 3, jnp.float32) for _ in range(3))
    gate, up = gate.astype(dtype), up.astype(dtype)
    ours = lambda g, u: jnp.sum(llama.swiglu(g, u).astype(jnp.float32) * weight)
    ref = lambda g, u: jnp.sum(_swiglu_formula(g, u).astype(jnp.float32) * weight)
    np.testing.assert_array_equal(llama.swiglu(gate, up), _swiglu_formula(gate, up))
    got, want = jax.grad(ours, (0, 1))(gate, up), jax.grad(ref, (0, 1))(gate, up)
    # float32: the sigmoid's two formulas differ by a few ulp, which d_gate's zero at g = -1.28 makes relative;
    # bfloat16: both round nearly the same float32 gradient to bfloat16, one ulp apart at most
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2 ** -7, atol=1e-5)
    for g, w in zip(got, want):
        assert g.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)


def test_swiglu_keeps_no_float32_intermediates_for_the_backward_pass():
    """The compiled gradient of four bfloat16 MLP blocks: with autodiff of the float32 product, XLA keeps float32
    intermediates of each block's forward pass ([tokens, intermediate]) until its backward pass; `swiglu` keeps
    only gate and up, so the scratch memory is smaller by at least one such array a block but the last."""
    rng = np.random.default_rng(1)
    tokens, hidden, intermediate, blocks = 512, 64, 256, 4
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.bfloat16)
    weights = [tuple(jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32)
                     for s in ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden)))
               for _ in range(blocks)]

    def temp_bytes(product):
        def loss(weights):
            h = x
            for w_gate, w_up, w_down in weights:
                act = product(llama.project(h, w_gate, jnp.bfloat16), llama.project(h, w_up, jnp.bfloat16))
                h = h + llama.project(act, w_down, jnp.bfloat16)
            return jnp.sum(h.astype(jnp.float32))
        return jax.jit(jax.grad(loss)).lower(weights).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(llama.swiglu) + (blocks - 1) * tokens * intermediate * 4 <= temp_bytes(_swiglu_formula)


@pytest.mark.parametrize("scan,masked", [(False, True), (True, False)], ids=["loop_masked", "scan_remat_causal"])
def test_jax_attention_equals_the_own_one(scan, masked):
    """`attention="jax"` (jax.nn.dot_product_attention; cuDNN's flash attention on NVIDIA GPUs) computes what the
    own attention does, with padding and packed segments (a boolean mask) and without (the causal flag alone, here
    through scanned and rematerialised layers); gradients included."""
    cfg = CFG.replace(scan_layers=scan, remat_policy="full" if scan else "none")
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    mask = jnp.asarray([[1] * 12, [1] * 9 + [0] * 3], jnp.int32)
    segments = jnp.asarray([[0] * 6 + [1] * 3 + [2] * 3, [1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    inputs = {"attention_mask": mask, "segment_ids": segments} if masked else {}
    params = nn.meta.unbox(jax.jit(llama.LlamaForCausalLM(cfg).init)(jax.random.key(0), ids)["params"])
    weights = jnp.asarray(rng.normal(size=(2, 12, CFG.vocab_size)), jnp.float32) * mask[..., None]

    def value_and_grad(attention):
        model = llama.LlamaForCausalLM(cfg.replace(attention=attention))
        f = lambda p: jnp.sum(model.apply({"params": p}, ids, **inputs) * weights)
        return jax.jit(jax.value_and_grad(f))(params)

    (own, own_grads), (theirs, their_grads) = value_and_grad("own"), value_and_grad("jax")
    np.testing.assert_allclose(theirs, own, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 their_grads, own_grads)
    with pytest.raises(ValueError, match="attention='flash'"):
        CFG.replace(attention="flash")
