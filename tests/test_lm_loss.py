"""The fused LM head + next-token loss (`heads.lm_head_cross_entropy`, `heads.lm_loss`): the same value and gradients
as autodiff of the cross-entropy on the model's logits, in float32, in bfloat16, in token chunks and on a sharded
mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from w2s_jax import parallel
from w2s_jax.models import heads
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)


def reference_loss(cfg, params, blocks):
    """Autodiff's version: the model's logits, then optax's cross-entropy."""
    logits = LlamaForCausalLM(cfg).apply({"params": params}, blocks[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, blocks[:, 1:]))


def setup(tied=False, seed=0):
    cfg = CFG.replace(tie_word_embeddings=tied)
    blocks = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (4, 13)), jnp.int32)
    params = nn.meta.unbox(LlamaForCausalLM(cfg).init(jax.random.key(seed), blocks[:, :-1])["params"])
    return cfg, params, blocks


def rel_error(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - np.asarray(want, np.float64))
                 / np.linalg.norm(np.asarray(want, np.float64)))


@pytest.fixture(params=["default", "chunked"])
def chunk_bytes(request, monkeypatch):
    """The default chunking (one chunk at these sizes), or chunks of 4 KiB of logits (8 chunks for `setup`'s 48
    tokens and vocabulary of 96)."""
    if request.param == "chunked":
        monkeypatch.setattr(heads, "LOGITS_CHUNK_BYTES", 4096)
    return request.param


@pytest.mark.parametrize("chunks", [None, 1, 3, 8])
def test_value_and_gradients_equal_autodiff_with_an_outer_scale(chunks):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 40)) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 40, 24), jnp.int32)
    ref = lambda x, k: 3.0 * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ k, labels))
    ours = lambda x, k: 3.0 * heads.lm_head_cross_entropy(x, k, labels, chunks)
    # hand-computed value: mean over tokens of logsumexp minus the label's logit
    logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    want = 3.0 * np.mean(lse - logits[np.arange(24), np.asarray(labels)])
    np.testing.assert_allclose(float(ours(x, kernel)), want, rtol=1e-6)
    for got, ref_grad in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(ref, (0, 1))(x, kernel)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lm_loss_equals_the_logits_path(tied, chunk_bytes):
    cfg, params, blocks = setup(tied)
    value, grads = jax.value_and_grad(heads.lm_loss, argnums=1)(cfg, params, blocks)
    ref_value, ref_grads = jax.value_and_grad(reference_loss, argnums=1)(cfg, params, blocks)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-7),
                 grads, ref_grads)


def test_bfloat16_gradients_as_accurate_as_autodiff():
    """In bfloat16 the logits' gradient is kept in bfloat16: the parameter gradients must be float32 and as close
    to the float32 ones as autodiff of the same bfloat16 model gets."""
    cfg, params, blocks = setup(seed=2)
    bf16 = cfg.replace(dtype="bfloat16")
    exact = jax.grad(reference_loss, argnums=1)(cfg, params, blocks)
    plain = jax.grad(reference_loss, argnums=1)(bf16, params, blocks)
    ours = jax.grad(heads.lm_loss, argnums=1)(bf16, params, blocks)
    for path, want in jax.tree_util.tree_leaves_with_path(exact):
        got, ref = (dict(jax.tree_util.tree_leaves_with_path(t))[path] for t in (ours, plain))
        assert got.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert rel_error(got, want) < 1.25 * rel_error(ref, want) + 1e-3, jax.tree_util.keystr(path)


def test_sharded_equals_single_device(chunk_bytes):
    cfg, params, blocks = setup(seed=3)
    ref_value, ref_grads = jax.value_and_grad(heads.lm_loss, argnums=1)(cfg, params, blocks)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    shardings = parallel.param_shardings(LlamaForCausalLM(cfg), blocks[:, :-1], mesh)
    sharded = parallel.shard_params(params, shardings)
    fn = jax.jit(jax.value_and_grad(heads.lm_loss, argnums=1), static_argnums=0, out_shardings=(None, shardings))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        value, grads = fn(cfg, sharded, jax.device_put(blocks, parallel.batch_sharding(mesh)))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6),
                 grads, ref_grads)
    kernel = grads["lm_head"]["kernel"]
    assert {s.data.size for s in kernel.addressable_shards} == {kernel.size // 8}


def test_default_chunks_bound_the_logits_held_at_once():
    assert heads.loss_chunks(2048, 8192) == 4  # 64 MiB of float32 logits -> 16 MiB chunks
    assert heads.loss_chunks(2048, 32000) == 16  # 250 MiB -> 15.6 MiB
    assert heads.loss_chunks(48, 96) == 1
    assert heads.loss_chunks(2047, 32000) == 1  # no even split: one chunk
    assert heads.loss_chunks(6, 2 ** 30) == 2  # as far as the tokens divide
    with pytest.raises(ValueError, match="chunks=5 must divide the number of tokens"):
        heads.lm_head_cross_entropy(jnp.zeros((12, 4)), jnp.zeros((4, 8)), jnp.zeros(12, jnp.int32), 5)


def test_chunked_gradient_holds_one_chunk_of_logits():
    """The compiled gradient's scratch memory: at least all float32 logits of 2048 tokens (64 MiB) in one chunk,
    under half of them with the default chunks (4, each holding a quarter)."""
    x = jnp.zeros((2048, 32), jnp.bfloat16)
    kernel = jnp.zeros((32, 8192), jnp.float32)
    labels = jnp.zeros(2048, jnp.int32)

    def temp_bytes(chunks):
        grad = jax.jit(jax.grad(lambda x, k: heads.lm_head_cross_entropy(x, k, labels, chunks), (0, 1)))
        return grad.lower(x, kernel).compile().memory_analysis().temp_size_in_bytes

    logits = 2048 * 8192 * 4
    assert temp_bytes(1) >= logits
    # one chunk's logits (16 MiB) and their bfloat16 gradient (8 MiB), plus the small [tokens, hidden] arrays
    assert temp_bytes(None) < logits // 2
