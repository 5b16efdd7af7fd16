"""GGUF import: our params and logits equal transformers' own GGUF loading of the same file.

Tiny GGUF files are written here with the gguf package's writer from tiny random transformers LLaMAs, quantised
with gguf.quants (K-quants, which it cannot write, as random blocks), with q/k rows in llama.cpp's order and a tiny
byte-level BPE tokenizer in the metadata. The reference is transformers' GGUF loader (`load_gguf_checkpoint`, the
function its AutoConfig, AutoTokenizer and legacy from_pretrained path use; `from_pretrained(gguf_file=...)`
itself also needs `accelerate`). The real SmolLM2 file is tested when it is in the asset cache.
"""
import json
import time
import warnings

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from w2s_jax import assets, parallel
from w2s_jax.errors import UserError
from w2s_jax.models import convert
from w2s_jax.models.llama import LlamaForCausalLM

Q = gguf.GGMLQuantizationType
ATOL = 1e-4
CORPUS = ["the movie was good and the actors were great", "a bad film, boring and far too long",
          "I loved this wonderful story", "the plot was weak; the ending was worse", "positive negative review"] * 4
SPECIAL = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def bpe():
    """A tiny byte-level BPE tokenizer trained here (ids 0-2 are <unk>, <s>, </s>)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def bpe_metadata(tok):
    model = json.loads(tok.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llama_cpp_rows(w, heads):
    """llama.cpp's convert_hf_to_gguf order of q/k rows: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows, cols, rng):
    """Valid random Q4_K / Q6_K data (gguf.quants cannot quantise to them): random codes, small scales."""
    n = rows * cols // 256
    if qtype == Q.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit codes
        blocks = rng.integers(0, 256, (n, 144), dtype=np.uint8)
        blocks[:, 0:2] = np.full((n, 1), 3e-4, np.float16).view(np.uint8)
        blocks[:, 2:4] = np.full((n, 1), 2e-4, np.float16).view(np.uint8)
    else:  # Q6_K: 128 + 64 bytes of codes, 16 int8 scales, d (f16)
        blocks = rng.integers(0, 256, (n, 210), dtype=np.uint8)
        blocks[:, 192:208] = rng.integers(-8, 9, (n, 16), dtype=np.int8).view(np.uint8)
        blocks[:, 208:210] = np.full((n, 1), 1e-3, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(path, hf_cfg, weights, types, tok=None, arch="llama", metadata=None, extra=None, rng=None):
    """A GGUF file of `weights` (HF name -> float32 HF-layout array), each stored as `types(hf_name)`, and the
    `extra` tensors (GGUF name -> array) as they are."""
    rng = rng or np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(hf_cfg.num_attention_heads)
    w.add_head_count_kv(hf_cfg.num_key_value_heads)
    w.add_rope_freq_base(hf_cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(hf_cfg.head_dim)
    w.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
    w.add_vocab_size(hf_cfg.vocab_size)
    if tok is not None:
        tokens, merges = bpe_metadata(tok)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
    for key, value in (metadata or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    for name, x in weights.items():
        qtype = types(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf_cfg.num_attention_heads if "q_proj" in name else hf_cfg.num_key_value_heads
            x = llama_cpp_rows(x, heads)
        if qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(convert.gguf_name(name), random_k_blocks(qtype, *x.shape, rng), raw_dtype=qtype)
        elif qtype in (Q.F32, Q.F16, Q.I32):  # plain arrays: the writer infers the type from the dtype
            plain = {Q.F32: np.float32, Q.F16: np.float16, Q.I32: np.int32}[qtype]
            w.add_tensor(convert.gguf_name(name), x.astype(plain))
        else:
            w.add_tensor(convert.gguf_name(name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_hf_model(vocab, seed=0, **overrides):
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **overrides},
                                                                   attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


def hf_weights(model):
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def by_kind(norms=Q.F32, attn=Q.F32, mlp=Q.F32, embed=Q.F32, head=Q.F32):
    def types(name):
        if "norm" in name:
            return norms
        if "self_attn" in name:
            return attn
        if "mlp" in name:
            return mlp
        return embed if "embed_tokens" in name else head
    return types


# name: (model overrides, tensor types). Hidden 64 rows are two 32-blocks; the K-quants need 256.
VARIANTS = {
    "f32_gqa_untied": ({}, by_kind()),
    "f16_bf16_tied_mqa": (dict(tie_word_embeddings=True, num_key_value_heads=1),
                          by_kind(attn=Q.F16, mlp=Q.BF16, embed=Q.F16)),
    "q8_q4_like_smollm2": (dict(tie_word_embeddings=True), by_kind(attn=Q.Q4_1, mlp=Q.Q4_0, embed=Q.Q8_0)),
    "q4k_q6k": (dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
                by_kind(attn=Q.Q4_K, mlp=Q.Q6_K, embed=Q.Q6_K, head=Q.Q8_0)),
}


# Our LlamaConfig field -> transformers' name for it in the config its GGUF loader reads from the metadata.
CONFIG_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
                 "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim", "rope_theta": "rope_theta",
                 "max_position_embeddings": "max_position_embeddings", "tie_word_embeddings": "tie_word_embeddings",
                 "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


def transformers_reference(path, cfg):
    """transformers' own reading of the GGUF file: its dequantised, un-permuted tensors in a LLaMA built from our
    config, after checking that its reading of the metadata gives that config."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**convert.config_to_hf(cfg),
                                                                   attn_implementation="eager")).eval()
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    theirs = parsed["config"]
    assert {ours: getattr(cfg, ours) for ours in CONFIG_FIELDS} == {
        ours: theirs.get(name, getattr(cfg, ours)) for ours, name in CONFIG_FIELDS.items()}
    np.testing.assert_allclose(theirs["rms_norm_eps"], cfg.rms_norm_eps, rtol=1e-6)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return model


def logits_of(cfg, params, ids):
    return np.asarray(LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids)))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def written(bpe, tmp_path_factory):
    """written(name) -> (the transformers model, the path of its GGUF file), each file written once."""
    files = {}

    def get(name):
        if name not in files:
            overrides, types = VARIANTS[name]
            model = make_hf_model(bpe.get_vocab_size(), **overrides)
            path = tmp_path_factory.mktemp(name) / "model.gguf"
            files[name] = model, write_gguf(path, model.config, hf_weights(model), types, tok=bpe)
        return files[name]
    return get


@pytest.fixture(params=list(VARIANTS))
def variant(request, written):
    return (request.param, *written(request.param))


def test_logits_match_transformers_gguf_loading(variant):
    name, _, path = variant
    cfg, params = convert.load_gguf(path)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    np.testing.assert_allclose(logits_of(cfg, params, ids), torch_logits(transformers_reference(path, cfg), ids),
                               atol=ATOL, rtol=0)


def test_config_follows_the_metadata(variant):
    name, model, path = variant
    cfg = convert.checkpoint_config(path)
    hf = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert (cfg.tie_word_embeddings, cfg.rope_type, cfg.rope_theta, cfg.rms_norm_eps) == (
        hf.tie_word_embeddings, "default", 10000.0, 1e-5)
    assert (cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (128, 1, 2, 0)
    assert cfg.dtype == cfg.param_dtype == "float32"
    assert convert.load_gguf(path)[0] == cfg


def test_float_file_gives_back_the_exact_hf_weights(written):
    """F32 tensors: our params are the HF model's, bit for bit (q/k rows un-permuted, kernels transposed)."""
    model, path = written("f32_gqa_untied")
    cfg, params = convert.load_gguf(path)
    layer = model.model.layers[1]
    for ours, theirs in ((params["layers_1"]["self_attn"]["q_proj"]["kernel"], layer.self_attn.q_proj.weight),
                         (params["layers_1"]["self_attn"]["k_proj"]["kernel"], layer.self_attn.k_proj.weight),
                         (params["layers_1"]["mlp"]["down_proj"]["kernel"], layer.mlp.down_proj.weight),
                         (params["lm_head"]["kernel"], model.lm_head.weight)):
        np.testing.assert_array_equal(np.asarray(ours), theirs.detach().numpy().T)


def test_scanned_bf16_load(written):
    _, path = written("q8_q4_like_smollm2")
    cfg, params = convert.load_gguf(path)
    scfg, scanned = convert.load_gguf(path, scan_layers=True, param_dtype="bfloat16", dtype="bfloat16")
    assert scfg.scan_layers and scanned["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(scanned["layers"]["mlp"]["up_proj"]["kernel"][1], np.float32),
                                  np.asarray(params["layers_1"]["mlp"]["up_proj"]["kernel"].astype(jnp.bfloat16),
                                             np.float32))


def test_sharded_load_reads_only_its_slices(written, monkeypatch):
    """On a (fsdp 4, tensor 2) mesh every array is built shard by shard; column slices cut through quant blocks."""
    _, path = written("q8_q4_like_smollm2")
    _, full = convert.load_gguf(path)
    reads = []
    original = convert._GGUFReader.read

    def recording_read(self, hf_name, index=None):
        out = original(self, hf_name, index)
        reads.append((hf_name, out.size))
        return out
    monkeypatch.setattr(convert._GGUFReader, "read", recording_read)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    cfg, params = convert.load_gguf(path, mesh=mesh)
    expected = parallel.param_shardings(LlamaForCausalLM(cfg), jnp.zeros((1, 4), jnp.int32), mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 params, expected)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, full)
    q_size = cfg.hidden_size * cfg.num_attention_heads * cfg.head_dim
    assert {size for n, size in reads if n.endswith("q_proj.weight")} == {q_size // 8}


def test_an_early_exit_reads_only_its_layers(written, monkeypatch):
    """`layers=1`: the first decoder layer, the final norm and the LM head, as in the whole file; nothing of the
    other layers is dequantised, and their tensors are not reported as unexpected."""
    _, path = written("q8_q4_like_smollm2")
    full_cfg, full = convert.load_gguf(path)
    reads = []
    original = convert._GGUFReader.read
    monkeypatch.setattr(convert._GGUFReader, "read", lambda self, name, index=None: reads.append(name) or
                        original(self, name, index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, params = convert.load_gguf(path, layers=1)
    assert cfg == full_cfg.replace(num_hidden_layers=1) and full_cfg.num_hidden_layers > 1
    assert reads and not [n for n in reads if n.startswith("model.layers.") and not n.startswith("model.layers.0.")]
    kept = {k: v for k, v in full.items() if not k.startswith("layers_") or k == "layers_0"}
    assert sorted(params) == sorted(kept)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, kept)
    with pytest.raises(UserError, match=r"layers=-1, but the checkpoint has"):
        convert.load_gguf(path, layers=-1)


def test_tokenizer_from_the_gguf_metadata(written, bpe):
    _, path = written("q8_q4_like_smollm2")
    tok = convert.load_tokenizer(path)
    text = "the movie was wonderful; a great story!"
    assert tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text).ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_tokenizer_is_built_once_then_loaded_from_the_cache(written, bpe, tmp_path, monkeypatch):
    _, path = written("q8_q4_like_smollm2")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    built = []
    build = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: built.append(k.get("gguf_file")) or build(*a, **k))
    first, second = convert.load_tokenizer(path), convert.load_tokenizer(path)
    assert built == ["model.gguf", None]  # from the GGUF metadata once, then from the saved files
    [saved] = (tmp_path / "cache" / "tokenizers").iterdir()
    assert saved.name.startswith("model-") and (saved / "tokenizer.json").is_file()
    text = "the movie was wonderful; a great story!"
    for tok in (first, second):
        assert tok(text)["input_ids"] == first(text)["input_ids"]
        assert tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text).ids
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    # a cache that cannot be written (a file where its folder should be) costs the time, not the tokenizer
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache" / "tokenizers" / saved.name / "tokenizer.json"))
    assert convert.load_tokenizer(path)(text)["input_ids"] == first(text)["input_ids"]
    assert built[-1] == "model.gguf"


# ----------------------------------------------------------------------------------------------------------------
# Rope scaling


def llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original):
    """What llama.cpp's converter writes for LLaMA-3.1 rope scaling: one divisor per rotary frequency."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, ramp)).astype(
        np.float32)


def test_llama3_rope_from_rope_freqs_matches_transformers(bpe, tmp_path):
    """LLaMA-3.1 scaling lives in the `rope_freqs.weight` tensor; transformers' GGUF loader ignores it, so the
    reference is the original (safetensors-style) model."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    model = make_hf_model(bpe.get_vocab_size(), num_attention_heads=4, hidden_size=64, rope_theta=500000.0,
                          rope_scaling=scaling)
    divisors = llama_cpp_rope_freqs(500000.0, 16, factor=8.0, low=1.0, high=4.0, original=64)
    plain = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(plain / model.model.rotary_emb.inv_freq.numpy(), divisors, rtol=1e-5)
    path = write_gguf(tmp_path / "llama3.gguf", model.config, hf_weights(model), by_kind(),
                      metadata={"llama.rope.scaling.original_context_length": 64},
                      extra={"rope_freqs.weight": divisors})
    cfg, params = convert.load_gguf(path)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_position, cfg.rope_theta) == ("llama3", 8.0, 1.0, 4.0, 64, 500000.0)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 40)).astype(np.int32)
    np.testing.assert_allclose(logits_of(cfg, params, ids), torch_logits(model, ids), atol=ATOL, rtol=0)


def small_file(tmp_path, name="model.gguf", arch="llama", metadata=None, types=by_kind(), edit=None, extra=None):
    model = make_hf_model(64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1)
    weights = hf_weights(model)
    if edit:
        edit(weights)
    return write_gguf(tmp_path / name, model.config, weights, types, arch=arch, metadata=metadata, extra=extra)


def test_linear_rope_scaling_and_defaults_from_metadata(tmp_path):
    """A file with only the required metadata: the rest takes LLaMA's defaults (kv heads = heads, head_dim)."""
    path = tmp_path / "linear.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(4.0)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = convert.checkpoint_config(path)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 4.0, 10000.0)
    assert (cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == (64, 2, 16, True)


def test_a_file_is_parsed_once_until_it_changes(tmp_path):
    """Loading the same file again reuses its parsed metadata; a file rewritten at the same path is read anew."""
    path = small_file(tmp_path)
    assert convert._open_gguf(path) is convert._open_gguf(path)
    _, first = convert.load_gguf(path)
    double = lambda weights: weights.update({k: 2 * v for k, v in weights.items()})
    small_file(tmp_path, edit=double, metadata={"test.revision": 2})  # new weights, another size
    _, second = convert.load_gguf(path)
    np.testing.assert_allclose(second["embed_tokens"]["embedding"], 2 * first["embed_tokens"]["embedding"],
                               rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file and what is wrong with it


def test_unsupported_architecture(tmp_path):
    path = small_file(tmp_path, arch="qwen2")
    with pytest.raises(UserError) as e:
        convert.load_gguf(path)
    assert str(e.value) == f"{path}: GGUF architecture 'qwen2' is not supported (only 'llama')"


def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    for call in (convert.load_gguf, convert.load_checkpoint, convert.checkpoint_config, convert.load_tokenizer):
        with pytest.raises(UserError) as e:
            call(path)
        assert str(e.value) == f"{path}: no such GGUF file"


def test_unsupported_tensor_type(tmp_path):
    types = by_kind()
    path = small_file(tmp_path, types=lambda n: Q.I32 if n.endswith("v_proj.weight") else types(n))
    with pytest.raises(UserError) as e:
        convert.load_gguf(path)
    assert str(e.value) == (f"{path}: tensor 'blk.0.attn_v.weight' has type I32, which cannot be dequantised "
                            f"(use one of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")


def test_missing_tensor_and_wrong_shape(tmp_path):
    path = small_file(tmp_path, edit=lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_gguf(path)
    assert str(e.value) == (f"{path}: GGUF file has no tensor 'blk.0.ffn_up.weight' "
                            f"(model.layers.0.mlp.up_proj.weight)")
    assert isinstance(e.value, UserError)
    path = small_file(tmp_path, name="shape.gguf", edit=lambda w: w.update(
        {"model.layers.0.mlp.up_proj.weight": np.zeros((32, 32), np.float32)}))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_gguf(path)
    assert str(e.value) == (f"{path}: tensor 'blk.0.ffn_up.weight' has shape (32, 32), expected (64, 32) "
                            f"from the GGUF metadata")


def test_not_a_gguf_file_and_bad_rope_freqs(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match=r"fake.gguf: not a readable GGUF file \(GGUF magic invalid\)$"):
        convert.load_gguf(path)
    path = small_file(tmp_path, name="rope.gguf", extra={"rope_freqs.weight": np.full(8, 3.0, np.float32)})
    with pytest.raises(UserError) as e:
        convert.checkpoint_config(path)
    assert str(e.value) == (f"{path}: tensor 'rope_freqs.weight' is not LLaMA-3.1 rope scaling (factor 3.0, "
                            f"low/high frequency factors 1/4, original context 8192); other frequency factors "
                            f"are not supported")


def test_checkpoint_dispatch(tmp_path, written):
    _, path = written("f32_gqa_untied")
    hf_dir = tmp_path / "hf"
    cfg, params = convert.load_gguf(path)
    convert.save_hf(cfg, params, hf_dir)
    assert convert.checkpoint_kind(path) == "gguf" and convert.checkpoint_kind(hf_dir) == "hf"
    assert convert.checkpoint_config(hf_dir) == convert.checkpoint_config(path) == cfg
    hf_cfg, hf_params = convert.load_checkpoint(hf_dir)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), hf_params, params)
    with pytest.raises(UserError) as e:
        convert.load_checkpoint(tmp_path)
    assert str(e.value) == f"checkpoint {tmp_path}: neither a .gguf file nor a directory with config.json"


# ----------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file (docs/ASSETS.md), when it has been fetched


@pytest.fixture(scope="module")
def smollm2():
    """(path, config, params, seconds to load) of the real file; skipped when it has not been fetched."""
    if not assets.is_cached(assets.SMOLLM2):
        pytest.skip(f"SmolLM2 GGUF not in the asset cache {assets.cache_dir()} "
                    f"(fetch it with `python -m w2s_jax.assets smollm2`)")
    path = assets.smollm2_gguf()
    start = time.perf_counter()
    cfg, params = convert.load_gguf(path)
    return path, cfg, params, time.perf_counter() - start


def test_smollm2_config(smollm2):
    _, cfg, _, _ = smollm2
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (49152, 576, 1536, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.tie_word_embeddings, cfg.rope_type, cfg.rope_theta, cfg.rms_norm_eps) == (True, "default", 1e5, 1e-5)
    assert (cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (8192, 1, 2, 2)


def test_smollm2_logits_match_transformers(smollm2):
    path, cfg, params, seconds = smollm2
    tok = convert.load_tokenizer(path)
    prompt = "Review: a gorgeous, witty, moving film.\nQuestion: Is this review positive or negative?\nAnswer:"
    ids = np.asarray([tok(prompt)["input_ids"]], np.int32)
    ours = logits_of(cfg, params, ids)
    theirs = torch_logits(transformers_reference(path, cfg), ids)
    print(f"SmolLM2 GGUF load: {seconds:.1f} s; max |logit difference| {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    positive, negative = (tok(w, add_special_tokens=False)["input_ids"] for w in (" positive", " negative"))
    assert len(positive) == len(negative) == 1
