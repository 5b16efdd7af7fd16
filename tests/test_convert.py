"""Checkpoint conversion errors, config.json parsing and model presets (no PyTorch needed here)."""
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from w2s_jax.errors import UserError
from w2s_jax.models import convert
from w2s_jax.models.convert import (CheckpointError, config_from_hf, config_to_hf, load_hf, save_hf,
                                    tensor_specs)
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM
from w2s_jax.models.presets import PRESETS, get_preset

CFG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def random_params(cfg, seed=0):
    params = LlamaForCausalLM(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return nn.meta.unbox(params)


@pytest.fixture
def checkpoint(tmp_path):
    """A valid checkpoint written by save_hf; tests break one thing in it."""
    save_hf(CFG, random_params(CFG), tmp_path)
    return tmp_path


def read_tensors(path):
    with safe_open(path / "model.safetensors", "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def rewrite_tensors(path, tensors):
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def edit_config(path, **changes):
    hf = json.loads((path / "config.json").read_text())
    hf.update(changes)
    (path / "config.json").write_text(json.dumps(hf))


def test_roundtrip_is_exact(checkpoint):
    params = jax.tree.map(np.asarray, random_params(CFG))
    cfg, loaded = load_hf(checkpoint)
    assert cfg == CFG
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), params)
    hf = read_tensors(checkpoint)
    np.testing.assert_array_equal(hf["model.layers.1.mlp.down_proj.weight"],
                                  params["layers_1"]["mlp"]["down_proj"]["kernel"].T)
    assert len(hf) == len(tensor_specs(CFG)) == 1 + 9 * 2 + 2


def test_missing_tensor_is_named(checkpoint):
    tensors = read_tensors(checkpoint)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite_tensors(checkpoint, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'") as e:
        load_hf(checkpoint)
    assert str(checkpoint) in str(e.value)


def test_wrong_shape_names_tensor_expected_and_found(checkpoint):
    tensors = read_tensors(checkpoint)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    rewrite_tensors(checkpoint, tensors)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                                              r"\(16, 16\), expected \(8, 16\)"):
        load_hf(checkpoint)


def test_unknown_rope_type_names_the_key(checkpoint):
    edit_config(checkpoint, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_type = 'yarn'"):
        load_hf(checkpoint)
    with pytest.raises(ValueError, match=r"rope_scaling\.type = 'dynamic'"):
        config_from_hf({**config_to_hf(CFG), "rope_parameters": None,
                        "rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_missing_config_json_names_the_path(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no config.json in {checkpoint}"):
        load_hf(checkpoint)


def test_no_safetensors_names_the_path(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"no \\*.safetensors files in {checkpoint}"):
        load_hf(checkpoint)


def test_index_pointing_to_missing_shard(checkpoint):
    weight_map = {spec.hf_name: "model-00002-of-00002.safetensors" for spec in tensor_specs(CFG)}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf(checkpoint)


def test_extra_tensors_warn_but_inv_freq_is_silent(checkpoint):
    tensors = read_tensors(checkpoint)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    rewrite_tensors(checkpoint, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hf(checkpoint)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.ones(16, np.float32)
    rewrite_tensors(checkpoint, tensors)
    with pytest.warns(UserWarning, match=r"unexpected tensors model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf(checkpoint)


def test_an_early_exit_reads_only_its_layers(checkpoint, monkeypatch):
    _, full = load_hf(checkpoint)
    reads = []
    original = convert._Reader.read
    monkeypatch.setattr(convert._Reader, "read", lambda self, name, index=None: reads.append(name) or
                        original(self, name, index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped layer's tensors are not "unexpected"
        cfg, params = load_hf(checkpoint, layers=1)
    assert cfg == CFG.replace(num_hidden_layers=1)
    assert reads and not [n for n in reads if n.startswith("model.layers.1.")]
    assert sorted(params) == sorted(k for k in full if k != "layers_1")
    jax.tree.map(np.testing.assert_array_equal, params, {k: v for k, v in full.items() if k != "layers_1"})
    assert load_hf(checkpoint, layers=2)[0] == CFG
    with pytest.raises(UserError, match=r"layers=3, but the checkpoint has 2 decoder layers"):
        load_hf(checkpoint, layers=3)


def test_bf16_checkpoint_loads_in_the_requested_dtype(tmp_path):
    bf16 = LlamaConfig(**{**CFG.__dict__, "param_dtype": "bfloat16"})
    params = random_params(bf16)
    save_hf(bf16, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    cfg, loaded = load_hf(tmp_path)  # our default: float32 whatever the checkpoint holds
    kernel = loaded["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert cfg.param_dtype == "float32" and kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kernel),
                                  np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float32))
    _, kept = load_hf(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert kept["norm"]["scale"].dtype == jnp.bfloat16


def test_config_roundtrip_and_hf_fields():
    cfg = get_preset("llama3.1-8b")
    hf = config_to_hf(cfg)
    assert hf["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
    assert config_from_hf(hf) == cfg
    assert config_from_hf(config_to_hf(CFG)) == CFG
    # LLaMA-3.1's eos is a list; null pad falls back to our default.
    cfg = config_from_hf({**hf, "eos_token_id": [128001, 128008, 128009], "pad_token_id": None})
    assert (cfg.eos_token_id, cfg.pad_token_id) == (128001, 0)


def test_config_from_hf_rejects_unsupported_architecture_features():
    base = config_to_hf(CFG)
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act = 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


# Published totals of the Hugging Face checkpoints.
@pytest.mark.parametrize("name,total", [
    ("llama1-7b", 6_738_415_616), ("llama2-7b", 6_738_415_616),
    ("llama1-13b", 13_015_864_320), ("llama2-13b", 13_015_864_320),
    ("llama3-8b", 8_030_261_248), ("llama3.1-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400),
])
def test_real_preset_param_counts(name, total):
    assert get_preset(name).num_params == total


def test_llama3_presets():
    cfg = get_preset("llama3-8b")
    assert (cfg.num_key_value_heads, cfg.vocab_size, cfg.rope_theta, cfg.rope_type) == (8, 128256, 500000.0, "default")
    assert get_preset("llama3.1-8b").rope_type == "llama3"
    small = get_preset("llama3.2-1b")
    assert (small.rope_type, small.rope_factor, small.tie_word_embeddings, small.head_dim) == ("llama3", 32.0, True, 64)


def test_tiny_and_bench_preset_sizes():
    sizes = {name: get_preset(name).num_non_embedding_params for name in ("tiny-s", "tiny-m", "tiny-l")}
    assert sizes["tiny-s"] < sizes["tiny-m"] < sizes["tiny-l"]  # a ladder: each rung clearly bigger
    assert sizes["tiny-m"] > 2 * sizes["tiny-s"] and sizes["tiny-l"] > 2 * sizes["tiny-m"]
    assert 3.8e6 <= get_preset("bench-4m").num_params <= 4.4e6
    assert 25e6 <= get_preset("bench-27m").num_params <= 29e6
    # num_params agrees with the parameters the model actually creates.
    cfg = get_preset("tiny-s", vocab_size=300)
    shapes = jax.eval_shape(lambda: random_params(cfg))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.num_params


def test_get_preset_errors_and_overrides():
    assert get_preset("tiny-m", vocab_size=1234, scan_layers=True).vocab_size == 1234
    assert PRESETS["tiny-m"].vocab_size != 1234  # overrides do not leak into the table
    with pytest.raises(ValueError, match="unknown model preset 'llama9'.*tiny-s.*bench-27m"):
        get_preset("llama9")
    with pytest.raises(ValueError, match=r"unknown LlamaConfig fields \['hiden_size'\]"):
        get_preset("tiny-s", hiden_size=3)
