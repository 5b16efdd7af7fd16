"""LLaMA checkpoints <-> our Flax params, without PyTorch: Hugging Face directories (config.json + safetensors)
both ways, and llama.cpp GGUF files (quantised or not) in.

Our kernels are HF's `weight.T` and q/k use HF's rotate_half layout, so HF conversion is a rename and a transpose;
GGUF adds dequantisation and undoing llama.cpp's q/k row order. With a mesh, `load_hf` and `load_gguf` build every
array straight into its sharding, reading from the files only the slices this process's devices hold; no device
(or host) ever holds a full copy of a sharded tensor.

A model's `checkpoint` may be either kind: `checkpoint_config`, `load_checkpoint` and `load_tokenizer` dispatch on
it (a path ending in `.gguf` is a GGUF file, anything else a HF directory).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return bf16 tensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from w2s_jax import parallel
from w2s_jax.errors import UserError
from w2s_jax.models.llama import ROPE_TYPES, LlamaConfig, LlamaForCausalLM, rope_inv_freq

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# Checkpoint tensors that carry no parameters (buffers some exporters save).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(UserError):
    """A checkpoint's tensors do not match its config (a tensor missing or of the wrong shape)."""


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


def first_layers(cfg: LlamaConfig, layers: int, where) -> LlamaConfig:
    """The config of the checkpoint's first `layers` decoder layers (0: all of them), with its final norm and LM
    head: an early exit. Unlike the paper's separately pretrained weak models, it shares its layers, and so some of
    its features, with the whole model. Loading only these layers reads and converts only their weights. `where`
    (the checkpoint, or the config key) starts the error for a count the checkpoint does not have."""
    n = cfg.num_hidden_layers
    if not 0 <= layers <= n:
        raise UserError(f"{where}: layers={layers}, but the checkpoint has {n} decoder layers; expected 0 (all) "
                        f".. {n}")
    return cfg.replace(num_hidden_layers=layers) if layers else cfg


def _check_tensors(reader: _Reader, specs: list[TensorSpec], known: list[TensorSpec] | None = None) -> None:
    """Every expected tensor is present with the expected shape; extra tensors only warn, except those of `known`
    (the whole model's, when only its first layers are read)."""
    for spec in specs:
        if spec.hf_name not in reader.files:
            raise CheckpointError(f"checkpoint {reader.path} is missing tensor {spec.hf_name!r}")
        found = reader.shape(spec.hf_name)
        if found != spec.hf_shape:
            raise CheckpointError(f"checkpoint {reader.path}: tensor {spec.hf_name!r} has shape {found}, "
                                  f"expected {spec.hf_shape} from config.json")
    expected = {s.hf_name for s in known or specs} | {"lm_head.weight"}  # a tied checkpoint may carry lm_head
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
            scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None, rules=None,
            layers: int = 0) -> tuple[LlamaConfig, dict]:
    """Load a HF LLaMA checkpoint directory into (LlamaConfig, params).

    `dtype`/`param_dtype` default to float32 whatever the checkpoint's dtype. With `mesh`, every param is created
    directly in its NamedSharding (logical axes -> mesh axes through `rules`, see `w2s_jax.parallel`). `layers`
    k > 0 reads only the first k decoder layers (see `first_layers`).
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    full = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    cfg = first_layers(full, layers, path)
    files = _weight_files(path)
    with contextlib.ExitStack() as stack:
        reader = _Reader(path, files, stack)
        _check_tensors(reader, tensor_specs(cfg), known=tensor_specs(full))
        params = _load_params(reader, cfg, mesh, rules)
    return cfg, params


def _load_params(reader, cfg: LlamaConfig, mesh: jax.sharding.Mesh | None, rules) -> dict:
    """Params from a checked reader (anything with `read(hf_name, index)`): host arrays on the default device, or
    with `mesh` every array built straight into its sharding."""
    specs = tensor_specs(cfg)
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    if mesh is None:
        return _host_loader(reader, cfg, specs, np_dtype)
    example = jnp.zeros((1, 1), jnp.int32)
    shardings = parallel.param_shardings(LlamaForCausalLM(cfg), example, mesh, rules)
    return _sharded_loader(reader, cfg, specs, np_dtype, shardings)


# ----------------------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp)
#
# The config is metadata (`llama.*`, `tokenizer.ggml.*`), the tensors have llama.cpp's names and most are quantised
# in blocks that run along each row. llama.cpp's converter also reorders the rows of q and k inside each head for
# its rotary kernel (pairs interleaved instead of HF's rotate_half halves); we undo that, so the params come out
# exactly as from the HF checkpoint the file was made from.

GGUF_SUFFIX = ".gguf"
# HF name -> GGUF name, outside the layers, and inside `model.layers.{i}.` -> `blk.{i}.`.
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# LLaMA-3.1 rope scaling: llama.cpp writes it as a tensor of per-frequency divisors, not as metadata.
_GGUF_ROPE_FACTORS = "rope_freqs.weight"
# The tensor types tests/test_gguf.py checks against transformers; gguf.quants dequantises more (Q5_*, Q2_K, IQ*).
GGUF_TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_MISSING = object()


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a HF LLaMA tensor: `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, inner = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[inner]}"


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).endswith(GGUF_SUFFIX)


def _open_gguf(path: Path) -> gguf.GGUFReader:
    """The file's metadata and tensor index; the file is memory-mapped, so no tensor is read yet. Parsing the
    metadata takes seconds (a 49k-token vocabulary is ~150k small fields), so a file opened before is not parsed
    again while its size and modification time are unchanged: a pipeline loads the same model once per run."""
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    stat = path.stat()
    return _read_gguf(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    """`gguf.GGUFReader(path)`, memoised on the file's identity; the reader is only read from (its arrays are a
    read-only memory map)."""
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # e.g. "GGUF magic invalid"
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def _gguf_value(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is _MISSING:
        raise UserError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
    return default


def _float32_value(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Keep the shortest decimal that is it."""
    return float(str(np.float32(x)))


def _rope_from_gguf(reader: gguf.GGUFReader, tensors: dict, theta: float, head_dim: int) -> dict:
    """Our rope fields: linear scaling from metadata, LLaMA-3.1 scaling from the `rope_freqs.weight` tensor."""
    path = reader.data.filename
    kind = _gguf_value(reader, "llama.rope.scaling.type", "none")
    factor = _gguf_value(reader, "llama.rope.scaling.factor", None) or _gguf_value(reader, "llama.rope.scale_linear",
                                                                                   None)
    rope = {"rope_theta": theta}
    if kind == "linear" or (kind == "none" and factor and factor != 1.0):
        if not factor:
            raise UserError(f"{path}: llama.rope.scaling.type is 'linear' but llama.rope.scaling.factor is missing")
        return {**rope, "rope_type": "linear", "rope_factor": _float32_value(factor)}
    if kind != "none":
        raise UserError(f"{path}: llama.rope.scaling.type = {kind!r} is not supported (supported: none, linear, "
                        f"and LLaMA-3.1 scaling given as {_GGUF_ROPE_FACTORS!r})")
    if _GGUF_ROPE_FACTORS not in tensors:
        return {**rope, "rope_type": "default"}
    # llama.cpp divides each frequency by its factor: 1 for the high frequencies, `factor` for the low ones and a
    # smooth ramp between. We recover the LLaMA-3.1 parameters (factor = the largest divisor; low 1, high 4 and the
    # original context 8192, as every LLaMA-3.x checkpoint has) and check they give back every divisor.
    t = tensors[_GGUF_ROPE_FACTORS]
    divisors = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
    llama3 = {**rope, "rope_type": "llama3", "rope_factor": _float32_value(divisors.max()),
              "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
              "rope_original_max_position": int(_gguf_value(reader, "llama.rope.scaling.original_context_length",
                                                            8192))}
    plain = LlamaConfig(head_dim=head_dim, rope_theta=theta)
    expected = np.asarray(rope_inv_freq(plain)) / np.asarray(rope_inv_freq(plain.replace(**llama3)))
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-4):
        raise UserError(f"{path}: tensor {_GGUF_ROPE_FACTORS!r} is not LLaMA-3.1 rope scaling (factor "
                        f"{llama3['rope_factor']}, low/high frequency factors 1/4, original context "
                        f"{llama3['rope_original_max_position']}); other frequency factors are not supported")
    return llama3


def config_from_gguf(reader: gguf.GGUFReader, *, dtype: str | None = None, param_dtype: str | None = None,
                     scan_layers: bool = False, **overrides) -> LlamaConfig:
    """A LlamaConfig from a GGUF file's metadata and tensor index (the vocabulary is the embedding's rows; tied
    embeddings mean no `output.weight`). dtypes are ours to choose (default float32), as in `config_from_hf`."""
    path = reader.data.filename
    arch = _gguf_value(reader, "general.architecture", None)
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def key(name, default=_MISSING):
        return _gguf_value(reader, f"llama.{name}", default)

    experts = key("expert_count", 0)
    if experts:
        raise UserError(f"{path}: llama.expert_count = {experts}: mixture-of-experts models are not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF file has no tensor 'token_embd.weight'")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotated = int(key("rope.dimension_count", head_dim))
    if rotated != head_dim:
        raise UserError(f"{path}: llama.rope.dimension_count = {rotated} but head_dim = {head_dim}; "
                        f"partial rotary embeddings are not supported")
    defaults = LlamaConfig()

    def token_id(name, default):
        return int(_gguf_value(reader, f"tokenizer.ggml.{name}", default))

    fields = dict(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGML lists dimensions fastest first
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_float32_value(key("attention.layer_norm_rms_epsilon", defaults.rms_norm_eps)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(key("context_length", defaults.max_position_embeddings)),
        bos_token_id=token_id("bos_token_id", defaults.bos_token_id),
        eos_token_id=token_id("eos_token_id", defaults.eos_token_id),
        pad_token_id=token_id("padding_token_id", defaults.pad_token_id),
        dtype=dtype or defaults.dtype,
        param_dtype=param_dtype or defaults.param_dtype,
        scan_layers=scan_layers,
        **_rope_from_gguf(reader, tensors, _float32_value(key("rope.freq_base", 10000.0)), head_dim),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def _gguf_row_order(heads: int, head_dim: int) -> np.ndarray:
    """For each HF row of q (or k), the GGUF row that holds it.

    llama.cpp keeps each head's rotary pairs next to each other: HF row h*d + s*d/2 + i (half s, pair i) is GGUF
    row h*d + 2*i + s.
    """
    return np.arange(heads * head_dim).reshape(heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def _dequantize_columns(rows: np.ndarray, qtype: gguf.GGMLQuantizationType, start: int, stop: int) -> np.ndarray:
    """Columns [start, stop) of some rows of a GGUF tensor, as float32; only the blocks they touch are decoded."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if rows.dtype != np.uint8:  # F32, F16: the reader gives elements, not bytes
        block, block_bytes = 1, 1
    first, last = start // block, -(-stop // block)
    decoded = gguf.quants.dequantize(rows[:, first * block_bytes:last * block_bytes], qtype)
    return decoded[:, start - first * block:stop - first * block]


class _GGUFReader:
    """A GGUF file's tensors under their HF names, in HF layout, read (slices of them) as float32.

    Quantised blocks run along a row (one output unit of a Dense layer, one token of the embedding), so a slice of
    rows decodes only those rows and a slice of columns only the blocks it touches.
    """

    def __init__(self, reader: gguf.GGUFReader, cfg: LlamaConfig, full: LlamaConfig):
        self.path = Path(reader.data.filename)
        by_name = {t.name: t for t in reader.tensors}
        self.tensors, self.row_orders = {}, {}
        specs = tensor_specs(cfg)
        for spec in specs:
            name = gguf_name(spec.hf_name)
            if name not in by_name:
                raise CheckpointError(f"{self.path}: GGUF file has no tensor {name!r} ({spec.hf_name})")
            t = by_name[name]
            shape = tuple(int(n) for n in reversed(t.shape))
            if shape != spec.hf_shape:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {shape}, expected {spec.hf_shape} "
                                      f"from the GGUF metadata")
            try:  # decode the first row: the gguf package raises NotImplementedError for a type it cannot decode
                gguf.quants.dequantize(np.atleast_2d(t.data)[:1], t.tensor_type)
            except NotImplementedError:
                raise UserError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which cannot be "
                                f"dequantised (use one of {', '.join(GGUF_TESTED_TYPES)})") from None
            self.tensors[spec.hf_name] = t
        for i in range(cfg.num_hidden_layers):
            self.row_orders[f"model.layers.{i}.self_attn.q_proj.weight"] = _gguf_row_order(
                cfg.num_attention_heads, cfg.head_dim)
            self.row_orders[f"model.layers.{i}.self_attn.k_proj.weight"] = _gguf_row_order(
                cfg.num_key_value_heads, cfg.head_dim)
        unexpected = sorted(set(by_name) - {gguf_name(s.hf_name) for s in tensor_specs(full)} - {_GGUF_ROPE_FACTORS})
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
            warnings.warn(f"{self.path}: ignoring unexpected tensors {shown}", stacklevel=3)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        t = self.tensors[name]
        vector = len(t.shape) == 1
        data = t.data.reshape(1, -1) if vector else t.data
        if index is None:
            rows, columns = slice(None), slice(None)
        else:
            rows, columns = (slice(None), index[0]) if vector else index
        order = self.row_orders.get(name)
        data = data[rows] if order is None else data[order[rows]]
        start, stop, _ = columns.indices(int(t.shape[0]))
        x = _dequantize_columns(data, t.tensor_type, start, stop)
        return x[0] if vector else x


def load_gguf(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
              scan_layers: bool = False, mesh: jax.sharding.Mesh | None = None, rules=None,
              layers: int = 0) -> tuple[LlamaConfig, dict]:
    """Load a llama.cpp GGUF LLaMA (any tensor type the gguf package decodes) into (LlamaConfig, params).

    Same arguments and result as `load_hf`: quantised weights are dequantised into `param_dtype` (default float32).
    """
    path = Path(path)
    reader = _open_gguf(path)
    full = config_from_gguf(reader, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    cfg = first_layers(full, layers, path)
    tensors = _GGUFReader(reader, cfg, full)
    types = sorted({t.tensor_type.name for t in tensors.tensors.values()})
    log.info("%s: GGUF LLaMA, %d layers, hidden %d, tensor types %s -> %s params", path, cfg.num_hidden_layers,
             cfg.hidden_size, "/".join(types), cfg.param_dtype)
    return cfg, _load_params(tensors, cfg, mesh, rules)


# ----------------------------------------------------------------------------------------------------------------
# Either kind of checkpoint (what a model's `checkpoint` in a config may name)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"gguf" for an existing .gguf file, "hf" for a directory with config.json; else UserError (one line)."""
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file")
        return "gguf"
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"checkpoint {path}: neither a .gguf file nor a directory with {CONFIG_FILE}")
    return "hf"


def checkpoint_config(path: str | os.PathLike, **kwargs) -> LlamaConfig:
    """The checkpoint's LlamaConfig, from config.json or the GGUF metadata; reads no weights.
    `kwargs` go to `config_from_hf` / `config_from_gguf` (dtype, param_dtype, scan_layers, field overrides)."""
    path = Path(path)
    if checkpoint_kind(path) == "gguf":
        return config_from_gguf(_open_gguf(path), **kwargs)
    config_file = path / CONFIG_FILE
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return config_from_hf(hf, **kwargs)


def load_checkpoint(path: str | os.PathLike, **kwargs) -> tuple[LlamaConfig, dict]:
    """`load_gguf` or `load_hf` (same keyword arguments), by what `path` is."""
    load = load_gguf if checkpoint_kind(path) == "gguf" else load_hf
    return load(path, **kwargs)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer: a HF directory's own files, or the one a GGUF file describes (`gguf_tokenizer`)."""
    from transformers import AutoTokenizer
    path = Path(path)
    if checkpoint_kind(path) == "gguf":
        return gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def gguf_tokenizer(path: Path):
    """The tokenizer a GGUF file's `tokenizer.ggml.*` metadata describes. transformers builds it from the metadata
    (~7 s for SmolLM2's 49k-token vocabulary on 2 cores), so the result is saved once (`save_pretrained`) in the
    asset cache, under the hash of the file's metadata and tensor index (everything before the tensor data) and
    transformers' version; later runs load those files in well under a second. An unwritable cache only costs the
    time."""
    import transformers

    from w2s_jax import assets  # the asset cache (~/.cache/w2s_jax or $W2S_ASSETS)
    reader = _open_gguf(path)
    digest = hashlib.sha256(reader.data[:reader.data_offset])
    digest.update(transformers.__version__.encode())
    saved = assets.cache_dir() / "tokenizers" / f"{path.stem}-{digest.hexdigest()[:16]}"
    if saved.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(saved))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = None
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=saved.parent)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, saved)  # atomic: a process that saved it first keeps its copy, and this one is removed
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not saved.is_dir():
            log.info("%s: tokenizer not saved in %s (%s); it is built again next time", path, saved.parent, e)
    return tokenizer


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
