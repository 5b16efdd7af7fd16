"""Device mesh, logical-axis sharding rules and multi-host start-up.

Every parameter and main activation of the model carries logical axis names (`embed`, `mlp`, `heads`, ...).
A rules table maps each logical name onto the axes of a `("data", "fsdp", "tensor")` mesh, so the same model
runs data-parallel, fully sharded (FSDP) or tensor-parallel by changing the mesh sizes and, if needed, the rules.

Multi-host: call `init_distributed` first thing in the program, before any JAX device is touched. Its settings
come from the config (`dist_cfg`) or, where the config leaves them unset, from the environment:

    W2S_COORDINATOR      host:port of process 0's coordinator service
    W2S_NUM_PROCESSES    total number of processes
    W2S_PROCESS_ID       this process's index, 0 .. num_processes - 1

Any of them given means a multi-process run. With `mode="auto"` and none given, a multi-process launch that the
environment shows (a TPU pod slice, Slurm or Open MPI with several tasks) is joined through JAX's cluster
detection; otherwise the program runs as a single process. `mode="off"` is a single process, and an error where
the settings or the environment say otherwise: independent processes would each train alone on the same workdir.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax.errors import UserError

log = logging.getLogger(__name__)

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


class Batch(NamedTuple):
    """A batch that every step splits over the mesh's batch axes: `size` rows in `microbatches` parts, with the
    config keys (or flags) that set them, for messages."""
    size: int
    microbatches: int = 1
    size_key: str = "batch_size"
    micro_key: str = "microbatches"

    @property
    def rows(self) -> int:
        """Rows of one microbatch: what the batch axes split at a time."""
        return self.size // max(1, self.microbatches)

    def describe(self) -> str:
        if self.microbatches <= 1:
            return f"{self.size_key}={self.size}"
        return f"{self.size_key}={self.size} / {self.micro_key}={self.microbatches} = {self.rows} rows"


def _parse_mesh(mesh_cfg: Mapping | Any) -> list[int]:
    sizes = _as_dict(mesh_cfg)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise UserError(f"mesh config has unknown axes {unknown}; valid axes are {list(MESH_AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise UserError(f"mesh config {_described(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh config {_described(shape)}: sizes must be positive (or -1 for 'the rest')")
    return shape


def _described(shape: Sequence[int]) -> dict:
    return dict(zip(MESH_AXES, shape))


def _batch_devices(shape: Sequence[int], batch_axes: Sequence[str]) -> tuple[int, str]:
    """(how many ways the batch axes split a batch, "data x fsdp = 1 x 8") for a mesh shape."""
    sizes = [shape[MESH_AXES.index(a)] for a in batch_axes]
    return math.prod(sizes), f"{' x '.join(batch_axes) or '(none)'} = {' x '.join(map(str, sizes)) or '1'}"


def _fit_to_batches(shape: list[int], axis: int, batches: Sequence[Batch], batch_axes: Sequence[str]) -> None:
    """Shrink the -1 batch axis `axis` to the largest size whose batch axes split every (micro)batch; the devices
    it gives up go to `tensor`. Why: a default like fsdp=-1 must work on any slice, and 64 devices cannot split a
    batch of 32."""
    rows = math.gcd(*(b.rows for b in batches))
    others = math.prod(shape[i] for i, a in enumerate(MESH_AXES) if a in batch_axes and i != axis)
    if rows % others or "tensor" in batch_axes:
        return  # the fixed sizes cannot work: _check_batches says so
    size = math.gcd(shape[axis], rows // others)
    if size == shape[axis]:
        return
    tensor = MESH_AXES.index("tensor")
    wanted = shape[axis]
    shape[tensor] *= wanted // size
    shape[axis] = size
    smallest = min(batches, key=lambda b: b.rows)
    log.info("mesh: %s=-1 would split each batch %d ways, more than %s allows; using %s (the rest on tensor)",
             MESH_AXES[axis], wanted * others, smallest.describe(),
             " x ".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape)))


def _check_batches(shape: Sequence[int], batches: Sequence[Batch], batch_axes: Sequence[str]) -> None:
    """One-line error for a batch the batch axes cannot split; a warning for a microbatch that splits unevenly
    (it runs, but some devices compute on padding)."""
    n, axes = _batch_devices(shape, batch_axes)
    for b in batches:
        if b.size % n:
            raise UserError(f"{b.size_key}={b.size} is not a multiple of the {n} devices of the batch axes {axes}, "
                            "over which every batch is split; use a larger batch or move devices to mesh.tensor")
        if b.rows % n:
            log.warning("each microbatch has %d rows (%s), not a multiple of the %d devices of the batch axes %s: "
                        "some devices compute on padding; prefer fewer microbatches or a larger mesh.tensor",
                        b.rows, b.describe(), n, axes)


def mesh_shape(mesh_cfg: Mapping | Any, num_devices: int, batches: Sequence[Batch] = (),
               batch_axes: Sequence[str] = ("data", "fsdp")) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor) from `{"data": 1, "fsdp": -1, "tensor": 1}`; one size may be -1 (the rest).

    `batches` are the batches of the run. A -1 on a batch axis takes only as many devices as every batch and
    microbatch splits over (the rest go to `tensor`); a mesh given in full that cannot split a batch is an error.
    """
    shape = _parse_mesh(mesh_cfg)
    described = _described(shape)
    for b in batches:
        if b.microbatches < 1 or b.size % b.microbatches:
            raise UserError(f"{b.size_key}={b.size} is not a multiple of {b.micro_key}={b.microbatches}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(
                f"mesh config {described}: the fixed sizes (product {known}) do not divide the {num_devices} devices"
            )
        axis = shape.index(-1)
        shape[axis] = num_devices // known
        if batches and MESH_AXES[axis] in batch_axes:
            _fit_to_batches(shape, axis, batches, batch_axes)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"mesh config {described}: sizes multiply to {math.prod(shape)} but there are {num_devices} devices"
        )
    _check_batches(shape, batches, batch_axes)
    return tuple(shape)


def make_mesh(mesh_cfg: Mapping | Any = None, devices: Sequence[jax.Device] | None = None,
              batches: Sequence[Batch] = (), batch_axes: Sequence[str] = ("data", "fsdp")) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh over `devices` (default: all devices of all processes), fitted to
    `batches` (see `mesh_shape`)."""
    if mesh_cfg is None:
        mesh_cfg = {"fsdp": -1}
    num_devices = len(devices) if devices is not None else jax.device_count()
    shape = mesh_shape(mesh_cfg, num_devices, batches, batch_axes)
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


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes the `batch` rule splits batches over (("data", "fsdp") under DEFAULT_RULES)."""
    axes = nn.logical_to_mesh_axes(("batch",), resolve_rules(rules))[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


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
        raise UserError(f"distributed.mode={mode!r} is not one of 'auto', 'explicit', 'off'")
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
                raise UserError(f"distributed.{key} ({env_name}) must be an integer, got {value!r}") from None
        settings[key] = value
    return settings


def _positive_int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """What shows that this process is one of several of a launch (e.g. "SLURM_NTASKS=4"); None when nothing does.

    Reads the variables of TPU pod slices, multislice, Slurm and Open MPI; for the real environment (`environ`
    None) also JAX's own cluster detection, which asks a Cloud TPU VM's metadata server for its workers.
    """
    env = os.environ if environ is None else environ
    for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(var, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"{var} lists {len(hosts)} hosts"
    for var in ("MEGASCALE_NUM_SLICES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if _positive_int(env.get(var)) > 1:
            return f"{var}={env[var]}"
    return _jax_detected_cluster() if environ is None else None


def _jax_detected_cluster() -> str | None:
    """The cluster `jax.distributed.initialize()` would join, when it has several processes."""
    try:
        from jax._src.clusters import ClusterEnv  # private: JAX has no public "is there a cluster?" call
        with warnings.catch_warnings():  # e.g. "Kubernetes environment detected, but ..." in every k8s pod
            warnings.simplefilter("ignore")
            for env in ClusterEnv._cluster_types:
                if not env.opt_in_only_method and env.is_env_present():
                    n = env.get_process_count()
                    return f"JAX detects a {env.__name__} of {n} processes" if n > 1 else None
    except Exception as e:  # noqa: BLE001 -- detection must never stop a single-process run
        log.debug("JAX cluster detection failed: %r", e)
    return None


def _listed(settings: Mapping) -> str:
    return ", ".join(f"{k}={settings[k]!r} ({_ENV_VARS[k]})" for k in _ENV_VARS if settings[k] is not None)


def distributed_plan(settings: Mapping, cluster: str | None) -> dict | None:
    """Arguments for `jax.distributed.initialize` from the settings and the detected launch (`detect_cluster`);
    None for a single process. Settings that contradict each other, or the launch, are a UserError: a run that
    silently is not multi-process trains every process alone on the same workdir."""
    n, pid, mode = settings["num_processes"], settings["process_id"], settings["mode"]
    if n is not None and n < 1:
        raise UserError(f"distributed.num_processes={n} (W2S_NUM_PROCESSES): must be at least 1")
    if pid is not None and pid < 0:
        raise UserError(f"distributed.process_id={pid} (W2S_PROCESS_ID): must be at least 0")
    if pid is not None and n is not None and pid >= n:
        raise UserError(f"distributed.process_id={pid} is not below num_processes={n}: the processes are numbered "
                        f"0 .. {n - 1}")
    if n == 1:
        return None
    given = {k: settings[k] for k in _ENV_VARS if settings[k] is not None}
    missing = [f"{k} ({_ENV_VARS[k]})" for k in _ENV_VARS if settings[k] is None]
    if mode == "off":
        if given:
            raise UserError(f"distributed.mode='off' but {_listed(settings)} given, which make a multi-process "
                            "run: set distributed.mode=auto for one, or unset them for a single process")
        if cluster:
            raise UserError(f"distributed.mode='off' but this process is one of a multi-process launch ({cluster}): "
                            "every process would train alone and write the same workdir. Set "
                            "distributed.mode=auto to run them as one job, or distributed.num_processes=1 to run "
                            "this process alone")
        return None
    if mode == "explicit" and missing:
        raise UserError(f"distributed mode 'explicit' needs {', '.join(missing)}")
    if given and missing and not cluster:
        raise UserError(f"{_listed(settings)} given, so this is a multi-process run, but it lacks "
                        f"{', '.join(missing)}: every process needs process 0's coordinator_address (host:port), "
                        "num_processes and its own process_id")
    if given or cluster:
        return given
    return None


def init_distributed(dist_cfg: Mapping | Any = None) -> bool:
    """Start JAX's multi-process runtime; returns True when running with several processes.

    Idempotent, and a no-op for a single process (see `distributed_plan`). Call it before any device is touched.
    """
    global _single_process_decided
    if jax.distributed.is_initialized():
        return True
    if _single_process_decided:
        return False
    s = distributed_settings(dist_cfg)
    cluster = detect_cluster()
    kwargs = distributed_plan(s, cluster)
    if kwargs is None:
        _single_process_decided = True
        return False
    if s["local_device_ids"] is not None:
        kwargs["local_device_ids"] = s["local_device_ids"]
    # CPU processes exchange data through gloo; the setting is ignored by GPU and TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(initialization_timeout=s["initialization_timeout"], **kwargs)
    except ValueError as e:  # JAX's cluster detection could not fill in what was not given
        raise UserError(f"multi-process launch ({cluster or _listed(s)}): {e} Give distributed.coordinator_address, "
                        "num_processes and process_id (or W2S_COORDINATOR, W2S_NUM_PROCESSES, W2S_PROCESS_ID)"
                        ) from None
    from jax._src.distributed import global_state as state  # the ids JAX settled on, without touching a device
    log.info("distributed: process %s of %s (coordinator %s)", state.process_id, state.num_processes,
             state.coordinator_address)
    _exit_at_once_on_error(f"process {state.process_id} of {state.num_processes}")
    return True


def _exit_at_once_on_error(process: str) -> None:
    """Make an uncaught exception end this process at once (exit 1), its traceback followed by one line saying why.

    Why: at exit JAX waits in a shutdown barrier for every process. When a peer died, the usual cause of the error
    ("Connection closed by peer"), that wait lasts until the heartbeat timeout (100 s) and ends in an abort.
    Results are written after the last collective, so a process that lost a peer never writes any.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        print(f"error: {process} stopped on the error above, without waiting for the others. If it says "
              "'Connection closed by peer' or 'heartbeat', another process of this run died first: see its log. "
              "Run the same command on every host again to resume from the last checkpoint.",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    sys.excepthook = hook


__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "mesh_shape", "make_mesh", "resolve_rules", "logical_to_mesh_spec",
    "logical_to_mesh_sharding", "abstract_params", "logical_param_specs", "param_shardings", "batch_sharding",
    "shard_params", "batch_axes", "Batch", "distributed_settings", "detect_cluster", "distributed_plan",
    "init_distributed",
]
