"""Hugging Face LLaMA checkpoints (config.json + safetensors) <-> our Flax params, without PyTorch.

Our kernels are HF's `weight.T` and q/k use HF's rotate_half layout, so conversion is a rename and a transpose.
With a mesh, `load_hf` builds every array straight into its sharding, reading from the safetensors files only the
slices this process's devices hold; no device (or host) ever holds a full copy of a sharded tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return bf16 tensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from w2s_jax import parallel
from w2s_jax.models.llama import ROPE_TYPES, LlamaConfig, LlamaForCausalLM

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# Checkpoint tensors that carry no parameters (buffers some exporters save).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match its config.json (a tensor missing or of the wrong shape)."""


# (flax path inside a decoder layer, HF name inside `model.layers.{i}.`, is a Dense kernel (stored transposed))
_LAYER_TENSORS = (
    (("input_layernorm", "scale"), "input_layernorm.weight", False),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", False),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
)


# ----------------------------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(hf: dict) -> dict:
    """Our rope fields from either config.json form: `rope_parameters` (transformers 5) or top-level
    `rope_theta` + `rope_scaling` (the published LLaMA-1/2/3 checkpoints)."""
    if hf.get("rope_parameters"):
        key, params = "rope_parameters", dict(hf["rope_parameters"])
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        key, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)  # LLaMA-1 configs have no rope_theta
    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: {key}.{type_key} = {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    rope = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ValueError(f"config.json: {key} of type {rope_type!r} has no 'factor'")
        rope["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for theirs in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if theirs not in params:
                raise ValueError(f"config.json: {key} of type 'llama3' has no {theirs!r}")
        rope["rope_low_freq_factor"] = float(params["low_freq_factor"])
        rope["rope_high_freq_factor"] = float(params["high_freq_factor"])
        rope["rope_original_max_position"] = int(params["original_max_position_embeddings"])
    return rope


def _first_token_id(value: Any, default: int) -> int:
    """Token ids may be null or (LLaMA-3.1 eos) a list; we keep one int."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return int(value)


def checkpoint_dtype(hf: dict) -> str | None:
    """The dtype the checkpoint was saved in (`dtype`, or `torch_dtype` in older configs), for reference."""
    return hf.get("dtype") or hf.get("torch_dtype")


def config_from_hf(hf: dict, *, dtype: str | None = None, param_dtype: str | None = None,
                   scan_layers: bool = False, **overrides) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face config.json dict. dtypes are ours to choose (default float32);
    the checkpoint's own dtype is `checkpoint_dtype(hf)`."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json: missing required key {key!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act = {hf['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json: {key} = true is not supported (LLaMA has no biases)")
    if hf.get("model_type", "llama") != "llama":
        warnings.warn(f"config.json: model_type = {hf['model_type']!r}; loading it as a LLaMA", stacklevel=2)
    heads = int(hf["num_attention_heads"])
    defaults = LlamaConfig()
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", defaults.rms_norm_eps)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", defaults.max_position_embeddings)),
        bos_token_id=_first_token_id(hf.get("bos_token_id"), defaults.bos_token_id),
        eos_token_id=_first_token_id(hf.get("eos_token_id"), defaults.eos_token_id),
        pad_token_id=_first_token_id(hf.get("pad_token_id"), defaults.pad_token_id),
        dtype=dtype or defaults.dtype,
        param_dtype=param_dtype or defaults.param_dtype,
        scan_layers=scan_layers,
        **_rope_from_hf(hf),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def _rope_to_hf(cfg: LlamaConfig) -> dict:
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    return rope


def config_to_hf(cfg: LlamaConfig) -> dict:
    """A config.json dict that transformers' LlamaForCausalLM loads.

    Written in the transformers 5 form (`rope_parameters`, `dtype`) plus the older top-level `rope_theta`,
    `rope_scaling` and `torch_dtype`, so transformers 4.x reads the same model.
    """
    rope = _rope_to_hf(cfg)
    scaling = None if cfg.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "dtype": cfg.param_dtype,
        "torch_dtype": cfg.param_dtype,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------------------------------------------
# Tensor names and shapes


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it goes in the non-scanned Flax tree."""
    hf_name: str
    flax_path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    transpose: bool  # a Dense kernel: ours is weight.T

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape


def _layer_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, m = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    return {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h), "mlp.down_proj.weight": (h, m),
    }


def tensor_specs(cfg: LlamaConfig) -> list[TensorSpec]:
    """Every HF tensor of the model, in checkpoint order, with its Flax path (non-scanned layout)."""
    shapes = _layer_hf_shapes(cfg)
    vh = (cfg.vocab_size, cfg.hidden_size)
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), vh, False)]
    for i in range(cfg.num_hidden_layers):
        for path, name, transpose in _LAYER_TENSORS:
            specs.append(TensorSpec(f"model.layers.{i}.{name}", (f"layers_{i}",) + path, shapes[name], transpose))
    specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (cfg.hidden_size,), False))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), vh, True))
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Reading safetensors


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise FileNotFoundError(f"{index} lists {f.name}, which does not exist in {path}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        extra = " (PyTorch .bin checkpoints are not supported; re-save with safe_serialization)" if any(
            path.glob("*.bin")) else ""
        raise FileNotFoundError(f"no *.safetensors files in {path}{extra}")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="numpy") as f:
            files.update({name: shard for name in f.keys()})
    return files


class _Reader:
    """Open safetensors files and read (slices of) tensors by HF name."""

    def __init__(self, path: Path, files: dict[str, Path], stack: contextlib.ExitStack):
        self.path, self.files, self._stack, self._handles = path, files, stack, {}

    def _slice(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._handles[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        sl = self._slice(name)
        if index is None:
            index = tuple(slice(None) for _ in sl.get_shape())
        return np.asarray(sl[index])


def _check_tensors(reader: _Reader, specs: list[TensorSpec]) -> None:
    """Every expected tensor is present with the expected shape; extra tensors only warn."""
    for spec in specs:
        if spec.hf_name not in reader.files:
            raise CheckpointError(f"checkpoint {reader.path} is missing tensor {spec.hf_name!r}")
        found = reader.shape(spec.hf_name)
        if found != spec.hf_shape:
            raise CheckpointError(f"checkpoint {reader.path}: tensor {spec.hf_name!r} has shape {found}, "
                                  f"expected {spec.hf_shape} from config.json")
    expected = {s.hf_name for s in specs} | {"lm_head.weight"}  # a tied checkpoint may still carry lm_head
    unexpected = sorted(n for n in reader.files if n not in expected and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        warnings.warn(f"checkpoint {reader.path}: ignoring unexpected tensors {shown}", stacklevel=3)


def _hf_index(spec: TensorSpec, index: tuple[slice, ...]) -> tuple[slice, ...]:
    return index[::-1] if spec.transpose else index


def _read_flax(reader: _Reader, spec: TensorSpec, index: tuple[slice, ...] | None, dtype) -> np.ndarray:
    """(A slice of) one tensor in our layout and dtype; `index` is in Flax coordinates."""
    hf_index = None if index is None else _hf_index(spec, index)
    x = reader.read(spec.hf_name, hf_index)
    if spec.transpose:
        x = x.T
    return np.ascontiguousarray(x.astype(dtype))


def _tree_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _tree_get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            raise KeyError(f"params have no {'/'.join(path)!r}")
        tree = tree[key]
    return tree


def _scanned_groups(specs: list[TensorSpec]) -> tuple[list[TensorSpec], dict[tuple, list[TensorSpec]]]:
    """Split specs into non-layer ones and, per path inside a layer, the per-layer specs in layer order."""
    outside, groups = [], {}
    for spec in specs:  # tensor_specs lists layers in order
        if spec.flax_path[0].startswith("layers_"):
            groups.setdefault(spec.flax_path[1:], []).append(spec)
        else:
            outside.append(spec)
    return outside, groups


def _host_loader(reader: _Reader, cfg: LlamaConfig, specs: list[TensorSpec], dtype) -> dict:
    """Params as host numpy arrays -> jnp arrays on the default device."""
    params: dict = {}
    if cfg.scan_layers:
        outside, groups = _scanned_groups(specs)
        for spec in outside:
            _tree_set(params, spec.flax_path, jnp.asarray(_read_flax(reader, spec, None, dtype)))
        for path, group in groups.items():
            stacked = np.stack([_read_flax(reader, s, None, dtype) for s in group])
            _tree_set(params, ("layers",) + path, jnp.asarray(stacked))
    else:
        for spec in specs:
            _tree_set(params, spec.flax_path, jnp.asarray(_read_flax(reader, spec, None, dtype)))
    return params


def _cached(fn: Callable[[tuple], np.ndarray]) -> Callable[[tuple], np.ndarray]:
    """Replicated devices ask for the same slice; read it once."""
    cache: dict = {}

    def wrapper(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            cache[key] = fn(index)
        return cache[key]
    return wrapper


def _sharded_loader(reader: _Reader, cfg: LlamaConfig, specs: list[TensorSpec], dtype, shardings: dict) -> dict:
    """Params built shard by shard with make_array_from_callback; each callback reads only its slice."""
    params: dict = {}

    def place(flax_path, shape, read_slice):
        sharding = _tree_get(shardings, flax_path)
        array = jax.make_array_from_callback(shape, sharding, _cached(read_slice), dtype=dtype)
        _tree_set(params, flax_path, array)

    def full_index(index, ndim):
        return tuple(index) if index is not None else (slice(None),) * ndim

    if cfg.scan_layers:
        outside, groups = _scanned_groups(specs)
        for path, group in groups.items():
            shape = (len(group),) + group[0].flax_shape

            def read_layers(index, group=group, ndim=len(shape)):
                index = full_index(index, ndim)
                layers = range(len(group))[index[0]]
                return np.stack([_read_flax(reader, group[i], index[1:], dtype) for i in layers])
            place(("layers",) + path, shape, read_layers)
    else:
        outside = specs
    for spec in outside:
        place(spec.flax_path, spec.flax_shape,
              lambda index, spec=spec: _read_flax(reader, spec, full_index(index, len(spec.flax_shape)), dtype))
    return params


def load_hf(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
            scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None, rules=None) -> tuple[LlamaConfig, dict]:
    """Load a HF LLaMA checkpoint directory into (LlamaConfig, params).

    `dtype`/`param_dtype` default to float32 whatever the checkpoint's dtype. With `mesh`, every param is created
    directly in its NamedSharding (logical axes -> mesh axes through `rules`, see `w2s_jax.parallel`).
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    files = _weight_files(path)
    specs = tensor_specs(cfg)
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    with contextlib.ExitStack() as stack:
        reader = _Reader(path, files, stack)
        _check_tensors(reader, specs)
        if mesh is None:
            params = _host_loader(reader, cfg, specs, np_dtype)
        else:
            example = jnp.zeros((1, 1), jnp.int32)
            shardings = parallel.param_shardings(LlamaForCausalLM(cfg), example, mesh, rules)
            params = _sharded_loader(reader, cfg, specs, np_dtype, shardings)
    return cfg, params


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _to_host(x: Any) -> np.ndarray:
    """A full numpy copy of a (possibly sharded, possibly multi-host) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned params (one `layers` subtree with a leading layer axis) -> `layers_{i}` subtrees."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def save_hf(config: LlamaConfig, params: dict, path: str | os.PathLike) -> None:
    """Write config.json and model.safetensors (in the params' dtype) that transformers' from_pretrained loads.

    Sharded arrays are gathered to the host; in a multi-host run every process must call this, and only
    process 0 writes.
    """
    path = Path(path)
    params = nn.meta.unbox(params)
    host = jax.tree.map(_to_host, params)
    host = _unstack_layers(host, config.num_hidden_layers)
    tensors = {}
    for spec in tensor_specs(config):
        x = _tree_get(host, spec.flax_path)
        if tuple(x.shape) != spec.flax_shape:
            raise ValueError(f"param {'/'.join(spec.flax_path)} has shape {tuple(x.shape)}, "
                             f"expected {spec.flax_shape} from the config")
        tensors[spec.hf_name] = np.ascontiguousarray(x.T if spec.transpose else x)
    if jax.process_index() != 0:
        return
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
