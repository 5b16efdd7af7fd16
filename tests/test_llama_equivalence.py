"""Our Flax LLaMA, loaded from a HF checkpoint, computes the same logits as transformers' PyTorch LlamaForCausalLM.

Tiny random models are created here with transformers and saved to tmp_path; nothing is downloaded.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from w2s_jax.models.convert import config_from_hf, load_hf, save_hf
from w2s_jax.models.llama import LlamaForCausalLM

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=1),
    # original_max 64 with head_dim 8: the frequencies fall in all three llama3 bands (kept, smoothed, scaled).
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
}
ATOL = 1e-4


def make_hf_model(seed=0, **overrides):
    """A random fp32 HF LLaMA; norm weights are randomised too so a mis-mapped norm would show."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**{**BASE, **overrides}, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, ids, mask=None, positions=None, hidden=False):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
                    position_ids=None if positions is None else torch.tensor(np.asarray(positions)),
                    output_hidden_states=hidden)
    if hidden:
        return out.logits.numpy(), [h.numpy() for h in out.hidden_states]
    return out.logits.numpy()


def random_ids(shape, vocab, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved_variant(request, tmp_path_factory):
    model = make_hf_model(**VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_logits_match_transformers(saved_variant, scan):
    hf_model, path = saved_variant
    cfg, params = load_hf(path, scan_layers=scan)
    assert cfg.scan_layers == scan
    ids = random_ids((2, 12), cfg.vocab_size)
    ours = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)))
    assert ours.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_config_fields_follow_checkpoint(tmp_path):
    model = make_hf_model(**VARIANTS["llama3_rope"])
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (2, 8, 500000.0)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 64)
    assert cfg.dtype == cfg.param_dtype == "float32"
    k = params["layers_1"]["self_attn"]["k_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k), model.model.layers[1].self_attn.k_proj.weight.detach().numpy().T)


def padded_batch(vocab, side):
    """Two rows, one with 4 pad tokens on `side`; returns ids, mask, positions (cumsum(mask)-1 for left)."""
    ids = random_ids((2, 10), vocab, seed=3)
    mask = np.ones((2, 10), np.int32)
    if side == "right":
        mask[1, 6:] = 0
        positions = np.broadcast_to(np.arange(10), (2, 10)).astype(np.int32)
    else:
        mask[1, :4] = 0
        positions = (np.cumsum(mask, axis=1) - 1).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask, positions


@pytest.mark.parametrize("attention", ["own", "jax"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_on_real_tokens(tmp_path, side, attention):
    hf_model = make_hf_model(**VARIANTS["gqa"])
    hf_model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    cfg = cfg.replace(attention=attention)
    ids, mask, positions = padded_batch(cfg.vocab_size, side)
    ours = np.asarray(LlamaForCausalLM(cfg).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    theirs = hf_logits(hf_model, ids, mask, positions)
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[real], theirs[real], atol=ATOL, rtol=0)
    # The padded row's real tokens equal the same tokens run alone, unpadded.
    alone = ids[1][real[1]][None]
    ours_alone = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(alone)))
    np.testing.assert_allclose(ours[1][real[1]], ours_alone[0], atol=ATOL, rtol=0)


def test_positions_beyond_the_input_length_match_transformers(saved_variant):
    """Explicit positions up to max_position_embeddings (here 116..127 for 12 tokens) take the rotary table's far
    end; one past it gives NaN, never a silently wrong angle."""
    hf_model, path = saved_variant
    cfg, params = load_hf(path)
    ids = random_ids((2, 12), cfg.vocab_size)
    positions = np.broadcast_to(np.arange(cfg.max_position_embeddings - 12, cfg.max_position_embeddings), (2, 12))
    ours = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids),
                                                  positions=jnp.asarray(positions)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids, positions=positions), atol=ATOL, rtol=0)
    outside = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids),
                                                     positions=jnp.asarray(positions + 1)))
    assert np.isnan(outside).all()  # the NaN key reaches every query of its sequence


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_hidden_states_match_transformers(tmp_path, scan):
    hf_model = make_hf_model(**{**VARIANTS["gqa"], "num_hidden_layers": 3})
    hf_model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path, scan_layers=scan)
    ids = random_ids((2, 9), cfg.vocab_size)
    logits, hidden = LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    theirs_logits, theirs_hidden = hf_logits(hf_model, ids, hidden=True)
    assert len(hidden) == len(theirs_hidden) == cfg.num_hidden_layers + 1
    for ours_h, theirs_h in zip(hidden, theirs_hidden):
        np.testing.assert_allclose(np.asarray(ours_h), theirs_h, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), theirs_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant,scan", [("gqa", False), ("tied", True), ("llama3_rope", True)])
def test_save_hf_roundtrip_through_transformers(tmp_path, variant, scan):
    make_hf_model(**VARIANTS[variant]).save_pretrained(tmp_path / "src")
    cfg, params = load_hf(tmp_path / "src", scan_layers=scan)
    save_hf(cfg, params, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = random_ids((2, 11), cfg.vocab_size)
    ours = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(hf_logits(reloaded, ids), ours, atol=1e-5, rtol=0)
    assert reloaded.config.tie_word_embeddings == cfg.tie_word_embeddings
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "numpy") as f:
        assert ("lm_head.weight" in f.keys()) == (not cfg.tie_word_embeddings)
    # Our own loader reads our export back to the same config.
    cfg2, _ = load_hf(tmp_path / "out", scan_layers=scan)
    assert cfg2 == cfg


def test_old_style_config_json_loads(tmp_path):
    """A LLaMA-1/2-era config.json: top-level rope_theta / rope_scaling / torch_dtype, no kv heads or head_dim."""
    hf_model = make_hf_model(**VARIANTS["mha"], rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    hf_model.save_pretrained(tmp_path)
    old = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "vocab_size": BASE["vocab_size"], "hidden_size": BASE["hidden_size"],
           "intermediate_size": BASE["intermediate_size"], "num_hidden_layers": BASE["num_hidden_layers"],
           "num_attention_heads": BASE["num_attention_heads"], "max_position_embeddings": 128,
           "rms_norm_eps": BASE["rms_norm_eps"], "rope_theta": 20000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg, params = load_hf(tmp_path)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 2.0, 20000.0)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.param_dtype) == (4, 8, "float32")
    ids = random_ids((1, 12), cfg.vocab_size)
    ours = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_llama1_config_without_rope_theta_defaults_to_10000():
    cfg = config_from_hf({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "rope_scaling": None})
    assert (cfg.rope_theta, cfg.rope_type, cfg.num_key_value_heads, cfg.head_dim) == (10000.0, "default", 32, 128)


def test_sharded_checkpoint_with_index_loads(tmp_path):
    hf_model = make_hf_model(**VARIANTS["gqa"])
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_hf(tmp_path)
    ids = random_ids((2, 12), cfg.vocab_size)
    ours = np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant,attention", [("gqa", "own"), ("tied", "own"), ("gqa", "jax")])
def test_gradients_match_transformers(tmp_path, variant, attention):
    """The own attention has a hand-written backward, jax's its own: every parameter's gradient must equal PyTorch
    autograd's."""
    import jax

    model = make_hf_model(**VARIANTS[variant])
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    cfg = cfg.replace(attention=attention)
    ids, mask, _ = padded_batch(cfg.vocab_size, "right")
    weights = np.random.default_rng(3).normal(size=(*ids.shape, cfg.vocab_size)).astype(np.float32)
    weights *= np.asarray(mask)[..., None]  # padded positions do not count

    def loss(p):
        return jnp.sum(LlamaForCausalLM(cfg).apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)) * weights)

    grads = jax.grad(loss)(params)
    model.zero_grad()
    out = model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask))).logits
    (out * torch.tensor(weights)).sum().backward()
    for i in range(cfg.num_hidden_layers):
        for hf_name, ours in (("self_attn.q_proj", grads[f"layers_{i}"]["self_attn"]["q_proj"]["kernel"]),
                              ("self_attn.k_proj", grads[f"layers_{i}"]["self_attn"]["k_proj"]["kernel"]),
                              ("self_attn.v_proj", grads[f"layers_{i}"]["self_attn"]["v_proj"]["kernel"]),
                              ("self_attn.o_proj", grads[f"layers_{i}"]["self_attn"]["o_proj"]["kernel"]),
                              ("mlp.down_proj", grads[f"layers_{i}"]["mlp"]["down_proj"]["kernel"]),
                              ("input_layernorm", grads[f"layers_{i}"]["input_layernorm"]["scale"])):
            want = model.get_parameter(f"model.layers.{i}.{hf_name}.weight").grad.numpy()
            got = np.asarray(ours)
            got = got if got.ndim == 1 else got.T
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max(), err_msg=hf_name)
    np.testing.assert_allclose(np.asarray(grads["embed_tokens"]["embedding"]),
                               model.model.embed_tokens.weight.grad.numpy(), rtol=1e-3, atol=1e-4)


def test_bfloat16_gradients_as_accurate_as_plain_autodiff(tmp_path, monkeypatch):
    """Mixed precision (bfloat16 compute, float32 parameters) runs every matmul through the hand-written backwards
    (`project`, the attention core). Against the float32 gradients of plain JAX autodiff, ours must be float32 and
    as close as plain JAX autodiff of the same bfloat16 model (a wrong transpose or a dropped term would be off by
    O(1))."""
    import jax

    from w2s_jax.models import llama

    model = make_hf_model(**VARIANTS["gqa"])
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    ids, mask, _ = padded_batch(cfg.vocab_size, "right")
    weights = np.random.default_rng(3).normal(size=(*ids.shape, cfg.vocab_size)).astype(np.float32)

    def grads(dtype):
        def loss(p):
            logits = LlamaForCausalLM(cfg.replace(dtype=dtype)).apply({"params": p}, jnp.asarray(ids),
                                                                       jnp.asarray(mask))
            return jnp.sum(logits * weights)
        return dict(jax.tree_util.tree_leaves_with_path(jax.grad(loss)(params)))

    ours = grads("bfloat16")
    monkeypatch.setattr(llama, "project", llama._matmul)
    monkeypatch.setattr(llama, "dot_product_attention", lambda q, k, v, bias: llama._attention_fwd(q, k, v, bias)[0])
    exact, plain = grads("float32"), grads("bfloat16")  # plain JAX autodiff, no hand-written backward
    for path, want in exact.items():
        error = lambda g: np.linalg.norm(np.asarray(g) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
        assert ours[path].dtype == jnp.float32, jax.tree_util.keystr(path)
        assert 0 < error(ours[path]) < 1.25 * error(plain[path]) + 1e-3, (jax.tree_util.keystr(path),
                                                                         error(ours[path]), error(plain[path]))
