"""Device mesh, logical-axis sharding rules and multi-host start-up.

Every parameter and main activation of the model carries logical axis names (`embed`, `mlp`, `heads`, ...).
A rules table maps each logical name onto the axes of a `("data", "fsdp", "tensor")` mesh, so the same model
runs data-parallel, fully sharded (FSDP) or tensor-parallel by changing the mesh sizes and, if needed, the rules.

Multi-host: call `init_distributed` first thing in the program, before any JAX device is touched. Its settings
come from the config (`dist_cfg`) or, where the config leaves them unset, from the environment:

    W2S_COORDINATOR      host:port of process 0's coordinator service
    W2S_NUM_PROCESSES    total number of processes
    W2S_PROCESS_ID       this process's index, 0 .. num_processes - 1

With `mode="auto"` (the default) and none of them set, JAX's own cluster detection runs (Cloud TPU VMs, Slurm,
...); when it finds no cluster, the program runs as a single process.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (a name, a tuple of names, or None = replicated). First matching rule wins
# (Flax semantics); a rule whose mesh axis is already used by another dim of the same array is skipped.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),  # activations keep the full hidden dim; FSDP shards only the weights
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
)

Rules = Sequence[tuple[str, Any]]


def _as_dict(cfg: Any) -> dict:
    """A plain dict from None, a dict or an ml_collections ConfigDict."""
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(mesh_cfg: Mapping | Any, num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor) from `{"data": 1, "fsdp": -1, "tensor": 1}`; one size may be -1 (the rest)."""
    sizes = _as_dict(mesh_cfg)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh config has unknown axes {unknown}; valid axes are {list(MESH_AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    described = dict(zip(MESH_AXES, shape))
    if shape.count(-1) > 1:
        raise ValueError(f"mesh config {described}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh config {described}: sizes must be positive (or -1 for 'the rest')")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh config {described}: the fixed sizes (product {known}) do not divide the {num_devices} devices"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh config {described}: sizes multiply to {math.prod(shape)} but there are {num_devices} devices"
        )
    return tuple(shape)


def make_mesh(mesh_cfg: Mapping | Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh over `devices` (default: all devices of all processes)."""
    if mesh_cfg is None:
        mesh_cfg = {"fsdp": -1}
    num_devices = len(devices) if devices is not None else jax.device_count()
    shape = mesh_shape(mesh_cfg, num_devices)
    kwargs = {} if devices is None else {"devices": list(devices)}
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Rules and shardings


def resolve_rules(rules: Rules | None = None) -> tuple[tuple[str, Any], ...]:
    """The rules as a tuple of (logical name, mesh axes) pairs; None -> DEFAULT_RULES.

    Accepts config-style lists of pairs (lists become tuples) and checks every mesh axis is a real one.
    """
    if rules is None:
        return DEFAULT_RULES
    resolved = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"sharding rule #{i} {rule!r} is not a (logical name, mesh axes) pair")
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {axis!r}; "
                                 f"valid axes are {list(MESH_AXES)}")
        resolved.append((name, axes))
    return tuple(resolved)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(logical_spec: Sequence[str | None] | None, shape: Sequence[int] | None, mesh: Mesh,
                         rules: Rules | None = None, name: str = "array") -> P:
    """Mesh PartitionSpec for one array; a dim whose size the mesh axes do not divide stays replicated (warning)."""
    rules = resolve_rules(rules)
    if logical_spec is None:
        return P()
    mesh_spec = list(nn.logical_to_mesh_axes(tuple(logical_spec), rules))
    if shape is not None:
        for dim, (size, axes) in enumerate(zip(shape, mesh_spec)):
            n = _axis_size(mesh, axes)
            if n > 1 and size % n:
                warnings.warn(
                    f"{name}: dim {dim} ({logical_spec[dim]!r}, size {size}) is not divisible by mesh axes "
                    f"{axes!r} (size {n}); keeping that dim replicated", stacklevel=2)
                mesh_spec[dim] = None
    return P(*mesh_spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P) or x is None


def logical_to_mesh_sharding(logical_specs: Any, mesh: Mesh, rules: Rules | None = None,
                             shapes: Any = None) -> Any:
    """NamedSharding tree from a tree of logical PartitionSpecs (e.g. `nn.get_partition_spec(abstract_params)`).

    `shapes` (a matching tree of arrays or ShapeDtypeStructs) enables the divisibility fallback.
    """
    rules = resolve_rules(rules)

    def one(path, spec, shape=None):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, logical_to_mesh_spec(spec, shape, mesh, rules, name=name))

    if shapes is None:
        return jax.tree_util.tree_map_with_path(one, logical_specs, is_leaf=_is_spec)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, leaf: one(path, spec, leaf.shape), logical_specs, shapes, is_leaf=_is_spec)


def abstract_params(model: nn.Module, example_input: Any) -> Any:
    """Boxed (nn.Partitioned) ShapeDtypeStruct tree of the model's params, computed without allocating them."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), example_input))
    return variables["params"]


def logical_param_specs(model: nn.Module, example_input: Any) -> Any:
    """Logical PartitionSpec tree of the model's params."""
    return nn.get_partition_spec(abstract_params(model, example_input))


def param_shardings(model: nn.Module, example_input: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding tree matching the (unboxed) params of `model.init(rng, example_input)['params']`."""
    boxed = abstract_params(model, example_input)
    return logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.meta.unbox(boxed))


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """Sharding for batch arrays: the leading dim over the `batch` rule's mesh axes, the rest replicated."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), resolve_rules(rules)))


def shard_params(params: Any, shardings: Any) -> Any:
    """Place (unboxed) params onto their shardings."""
    return jax.device_put(nn.meta.unbox(params), shardings)


# ----------------------------------------------------------------------------------------------------------------
# Multi-host

_ENV_VARS = {"coordinator_address": "W2S_COORDINATOR", "num_processes": "W2S_NUM_PROCESSES",
             "process_id": "W2S_PROCESS_ID"}
_single_process_decided = False


def distributed_settings(dist_cfg: Mapping | Any = None, environ: Mapping[str, str] | None = None) -> dict:
    """The distributed settings: config values first, then W2S_* environment variables; `mode` defaults to auto."""
    environ = os.environ if environ is None else environ
    cfg = _as_dict(dist_cfg)
    mode = cfg.get("mode") or "auto"
    if mode not in ("auto", "explicit", "off"):
        raise ValueError(f"distributed mode {mode!r} is not one of 'auto', 'explicit', 'off'")
    settings = {"mode": mode, "local_device_ids": cfg.get("local_device_ids"),
                "initialization_timeout": int(cfg.get("initialization_timeout") or 300)}
    for key, env_name in _ENV_VARS.items():
        value = cfg.get(key)
        if value in (None, "", -1):
            value = environ.get(env_name) or None
        if value is not None and key != "coordinator_address":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"distributed {key} ({env_name}) must be an integer, got {value!r}") from None
        settings[key] = value
    return settings


def init_distributed(dist_cfg: Mapping | Any = None) -> bool:
    """Start JAX's multi-process runtime; returns True when running with several processes.

    Idempotent, and a no-op for `mode="off"` or a single process. Call it before any device is touched.
    """
    global _single_process_decided
    if jax.distributed.is_initialized():
        return True
    if _single_process_decided:
        return False
    s = distributed_settings(dist_cfg)
    if s["mode"] == "off" or s["num_processes"] == 1:
        _single_process_decided = True
        return False
    explicit = {k: s[k] for k in _ENV_VARS}
    if s["mode"] == "explicit":
        missing = [f"{k} ({_ENV_VARS[k]})" for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(f"distributed mode 'explicit' needs {', '.join(missing)}")
    # CPU processes exchange data through gloo; the setting is ignored by GPU and TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in explicit.items() if v is not None}
    if s["local_device_ids"] is not None:
        kwargs["local_device_ids"] = s["local_device_ids"]
    try:
        jax.distributed.initialize(initialization_timeout=s["initialization_timeout"], **kwargs)
    except ValueError as e:
        # JAX's cluster detection found no cluster and nothing was given: a plain single-process run.
        if s["mode"] == "auto" and not kwargs and "coordinator_address" in str(e):
            _single_process_decided = True
            return False
        raise
    return True


__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "mesh_shape", "make_mesh", "resolve_rules", "logical_to_mesh_spec",
    "logical_to_mesh_sharding", "abstract_params", "logical_param_specs", "param_shardings", "batch_sharding",
    "shard_params", "distributed_settings", "init_distributed",
]
