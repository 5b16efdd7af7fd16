"""Per-device memory of the real train step on a mesh, from XLA's own compilation: no accelerator, no weights.

    python bench/memory.py --config=configs/chess.py:llama2 --devices=16 --mesh.fsdp=16 \
        --model=llama2-13b --remat=full --batch=32 --microbatches=2 --hbm_gib=32

The script fakes `--devices` CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before jax
starts), builds the ('data', 'fsdp', 'tensor') mesh, and lowers and compiles the same train step the pipeline
runs (`train.make_choice_step` with the config's loss, optimizer, dtypes, scan_layers and remat; the state donated)
on abstract inputs: `jax.ShapeDtypeStruct`s carrying their shardings, so nothing is allocated. The model is a
preset of `w2s_jax/models/presets.py` (the architecture of the HF checkpoint the config would load).

It prints, per device, what `compiled.memory_analysis()` reports (arguments = params + optimizer state + batch,
outputs, aliased bytes, temporaries) with total = arguments + outputs - aliased + temporaries, next to the
analytic split of the arguments computed from the shardings, and whether the total fits `--hbm_gib`.
The LAST line is one JSON object with every number.

What the CPU compile does not see: TPU/GPU layout padding (tiled minor dims), allocator fragmentation, the
runtime's own buffers and XLA's different scheduling per backend. Leave headroom (see docs/SCALING.md).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

GIB = 1 << 30
MESH_AXES = ("data", "fsdp", "tensor")  # as w2s_jax.parallel.MESH_AXES (not imported: it imports jax)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined on demand, so that tests can import the helpers without absl flags)."""
    config_flags.DEFINE_config_file("config", "configs/chess.py:llama2", "Experiment config file[:preset].",
                                    lock_config=True)
    flags.DEFINE_integer("devices", 8, "Number of (virtual CPU) devices of the mesh.")
    for axis in MESH_AXES:
        flags.DEFINE_integer(f"mesh.{axis}", None, f"Size of the '{axis}' mesh axis (-1: the rest, fitted to the "
                                                    "batches as the pipeline does); default: the config's mesh.")
    flags.DEFINE_string("model", None, "Model preset (presets.py); default: <preset_family>-13b for the "
                                       "llama1/llama2 configs, else the config's largest preset.")
    flags.DEFINE_string("remat", None, "Remat policy: none, full, dots or dots_no_batch; default: the config's.")
    flags.DEFINE_bool("scan_layers", None, "Scan over layers; default: the config's model_defaults.")
    flags.DEFINE_integer("batch", None, "Global batch size; default: config train.batch_size.")
    flags.DEFINE_integer("microbatches", None, "Microbatches per step; default: config train.microbatches.")
    flags.DEFINE_integer("seq", None, "Sequence length L; default: config task.max_len.")
    flags.DEFINE_integer("scored", None, "choice_lm: scored candidate tokens T per example; default: L (the upper "
                                         "bound: every token after the prompt belongs to a candidate).")
    flags.DEFINE_integer("candidates", None, "Candidates K per example; default: 64 for choice_lm (chess legal "
                                             "moves, bucketed), 2 otherwise.")
    flags.DEFINE_string("loss", None, "Training loss; default: the first of config experiment.losses.")
    flags.DEFINE_float("hbm_gib", None, "Memory per device in GiB; reports whether the step fits.")


# ------------------------------------------------------------------------------------------------ pure helpers
def force_host_devices(n: int, environ=os.environ) -> None:
    """Make the CPU backend expose `n` devices (any earlier device count in XLA_FLAGS is replaced). Call before
    jax initialises its backends."""
    if n < 1:
        raise ValueError(f"--devices={n}: need at least one device")
    kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", environ.get("XLA_FLAGS", "")).split()
    environ["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
    environ["JAX_PLATFORMS"] = "cpu"


def fits(per_device_bytes: int, hbm_gib: float | None) -> bool | None:
    """Whether the per-device total fits `hbm_gib` GiB (None when no HBM size was given)."""
    if hbm_gib is None:
        return None
    return per_device_bytes <= hbm_gib * GIB


def default_model(cfg) -> str:
    """The biggest model a config trains: <family>-13b for the llama presets, else its largest `preset`."""
    from w2s_jax.models import presets
    family = cfg.get("preset_family", "")
    if family:
        return f"{family}-13b"
    names = [m.preset for m in cfg.models.values() if m.get("preset", "")]
    if not names:
        raise ValueError("the config names no model preset; pass --model=<preset>")
    return max(names, key=lambda n: presets.get_preset(n).num_params)


def gib(n: int) -> str:
    return f"{n / GIB:8.3f} GiB"


# ------------------------------------------------------------------------------------------------ the plan
def plan_from_flags(cfg) -> dict:
    """Every choice of the measurement, from the flags with the config's values as defaults."""
    mesh = {axis: int(cfg.mesh.get(axis, 1)) for axis in MESH_AXES}
    mesh.update({axis: FLAGS[f"mesh.{axis}"].value for axis in MESH_AXES if FLAGS[f"mesh.{axis}"].value is not None})
    scoring = cfg.task.scoring
    seq = FLAGS.seq or int(cfg.task.max_len)
    losses = [s.strip() for s in cfg.experiment.losses.split(",") if s.strip()] or ["xent"]
    md = cfg.model_defaults
    return {
        "devices": FLAGS.devices, "mesh": mesh, "model": FLAGS.model or default_model(cfg),
        "remat": FLAGS.remat or md.remat_policy,
        "scan_layers": bool(md.scan_layers if FLAGS.scan_layers is None else FLAGS.scan_layers),
        "dtype": md.dtype, "param_dtype": md.param_dtype, "attention": md.attention, "scoring": scoring,
        "optimizer": cfg.train.optimizer, "loss": FLAGS.loss or losses[0],
        "batch": FLAGS.batch or int(cfg.train.batch_size),
        "microbatches": FLAGS.microbatches or int(cfg.train.microbatches or 1),
        "seq": seq, "scored": FLAGS.scored or seq,
        "candidates": FLAGS.candidates or (64 if scoring == "choice_lm" else 2),
        "hbm_gib": FLAGS.hbm_gib,
    }


def check_plan(plan: dict, batch_devices: int, batch_axes: str) -> list[str]:
    """Errors for a batch the step cannot split; notes for a microbatch that splits unevenly over the devices
    that share the batch dimension (`batch_axes`, e.g. "data x fsdp = 1 x 16")."""
    b, n = plan["batch"], plan["microbatches"]
    if n < 1 or b % n:
        raise ValueError(f"--batch={b} is not a multiple of --microbatches={n}")
    if b % batch_devices:
        raise ValueError(f"--batch={b} is not a multiple of the {batch_devices} devices of the batch axes "
                         f"{batch_axes}, over which every batch is split; use a larger batch or move devices to "
                         "--mesh.tensor")
    if (b // n) % batch_devices:
        return [f"each microbatch has {b // n} examples (--batch={b} / --microbatches={n}), not a multiple of the "
                f"{batch_devices} devices of the batch axes {batch_axes}: some devices compute on padding; prefer "
                "fewer microbatches, a larger batch or a larger --mesh.tensor"]
    return []


def fit_mesh(cfg, plan: dict) -> tuple[dict, list[str]]:
    """The mesh the pipeline would build: a -1 batch axis fitted to the planned batch and the config's other
    batches (`parallel.mesh_shape`), with a note when that moved devices to tensor."""
    from w2s_jax import parallel
    from w2s_jax import train as train_lib

    batches = [parallel.Batch(plan["batch"], plan["microbatches"], "--batch", "--microbatches")]
    batches += [b for b in train_lib.config_batches(cfg) if b.size_key != "train.batch_size"]
    fitted = dict(zip(MESH_AXES, parallel.mesh_shape(plan["mesh"], plan["devices"], batches)))
    filled = dict(zip(MESH_AXES, parallel.mesh_shape(plan["mesh"], plan["devices"])))
    if fitted == filled:
        return fitted, []
    return fitted, [f"mesh {plan['mesh']} would be {' x '.join(map(str, filled.values()))}, more batch devices than "
                    f"{min(batches, key=lambda b: b.rows).describe()} splits over; fitted to "
                    f"{' x '.join(map(str, fitted.values()))} (data x fsdp x tensor), as the pipeline does"]


def batch_axes(runtime) -> tuple[int, str]:
    """(number of devices the batch dimension is split over, their description) under the runtime's rules."""
    axes = runtime.batch_sharding.spec[0] if len(runtime.batch_sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    sizes = [runtime.mesh.shape[a] for a in axes]
    described = f"{' x '.join(axes) or '(none)'} = {' x '.join(map(str, sizes)) or '1'}"
    return math.prod(sizes), described


def model_config(plan: dict):
    from w2s_jax.models import presets
    try:
        return presets.get_preset(plan["model"], dtype=plan["dtype"], param_dtype=plan["param_dtype"],
                                  scan_layers=plan["scan_layers"], remat_policy=plan["remat"],
                                  max_position_embeddings=max(plan["seq"], presets.get_preset(
                                      plan["model"]).max_position_embeddings))
    except ValueError as e:
        raise ValueError(f"--model / --remat: {e}") from None


def example_batch(plan: dict) -> dict:
    """A host batch of the planned shapes, built by the pipeline's own `collate` (so keys and dtypes match)."""
    from w2s_jax.data import batching
    item = {"src": 0, "prompt": [1], "cands": [[2]], "length": 2}
    return batching.collate([item], plan["scoring"], None, plan["batch"], plan["candidates"], plan["seq"],
                            plan["scored"])


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, as XLA allocates)."""
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def full_bytes(tree) -> int:
    import jax
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------ compile + measure
def abstract_inputs(cfg, plan: dict, lcfg, runtime):
    """(optimizer, sharded abstract TrainState, sharded abstract batch, sharding notes), nothing allocated."""
    import jax
    import numpy as np

    from w2s_jax import train as train_lib
    from w2s_jax.models import heads

    tx = train_lib.make_optimizer(cfg.train, total_steps=1000, lr=float(cfg.train.lr))
    n_head = heads.head_outputs(plan["scoring"], plan["candidates"])
    head = None if n_head == 0 else {"kernel": jax.ShapeDtypeStruct((lcfg.hidden_size, n_head),
                                                                    np.dtype(lcfg.param_dtype))}
    with warnings.catch_warnings(record=True) as caught:  # dims the mesh does not divide stay replicated
        warnings.simplefilter("always")
        abstract, shardings = train_lib.state_shardings(lcfg, head, tx, runtime)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=runtime.batch_sharding)
             for k, v in example_batch(plan).items()}
    return tx, state, batch, [str(w.message) for w in caught]


def compile_step(cfg, plan: dict, lcfg, runtime, tx, state, batch):
    """The pipeline's train step, jitted as `train.jit_step` does (state donated), compiled for abstract inputs."""
    import jax

    from w2s_jax import losses as losses_lib
    from w2s_jax import train as train_lib

    loss = losses_lib.get(plan["loss"], **dict(cfg.losses.get(plan["loss"], {})))
    step_fn = train_lib.make_choice_step(lcfg, plan["scoring"], loss, tx, 1000, plan["microbatches"])
    shardings = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(step_fn, in_shardings=(shardings, runtime.batch_sharding),
                     out_shardings=(shardings, runtime.replicated), donate_argnums=0)
    with runtime.tracing():
        return jitted.lower(state, batch).compile()


def measure(cfg, plan: dict) -> dict:
    """Compile the train step for `plan` on abstract sharded inputs and collect XLA's per-device memory analysis."""
    import jax

    from w2s_jax import parallel
    from w2s_jax import train as train_lib
    from w2s_jax.models import llama, onednn

    llama.CPU_LAYOUT_PINS = False  # compile the accelerator's program: XLA:CPU's layout pins are not part of it
    onednn.ENABLED = False  # nor are the oneDNN matmuls of a single-CPU-device program
    if jax.device_count() != plan["devices"]:
        raise RuntimeError(f"jax sees {jax.device_count()} devices, not --devices={plan['devices']}: was jax "
                           "initialised before XLA_FLAGS was set?")
    plan["mesh"], fit_notes = fit_mesh(cfg, plan)
    runtime = train_lib.make_runtime(plan["mesh"], list(cfg.logical_rules) or None)
    notes = fit_notes + check_plan(plan, *batch_axes(runtime))
    if plan["attention"] != "own":
        notes.append(f"model_defaults.attention={plan['attention']!r} is planned as the own attention: a CPU compile "
                     "cannot plan cuDNN's flash attention, which needs less memory (no [L, L] scores)")
    lcfg = model_config(plan)
    tx, state, batch, sharding_notes = abstract_inputs(cfg, plan, lcfg, runtime)
    t0 = time.perf_counter()
    mem = compile_step(cfg, plan, lcfg, runtime, tx, state, batch).memory_analysis()
    compile_s = time.perf_counter() - t0

    analytic = {"params": shard_bytes(state.params), "opt_state": shard_bytes(state.opt_state),
                "step": shard_bytes(state.step), "batch": shard_bytes(batch)}
    compiled = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
                "generated_code": int(mem.generated_code_size_in_bytes)}
    per_device = compiled["arguments"] + compiled["outputs"] - compiled["aliased"] + compiled["temporaries"]
    return {
        **plan,
        "num_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "total_param_bytes": full_bytes(state.params),
        "total_opt_state_bytes": full_bytes(state.opt_state),
        "per_device_analytic": analytic,
        "per_device_compiled": compiled,
        "per_device_bytes": per_device,
        "per_device_gib": round(per_device / GIB, 4),
        "hbm_fraction": None if plan["hbm_gib"] is None else round(per_device / (plan["hbm_gib"] * GIB), 4),
        "fits": fits(per_device, plan["hbm_gib"]),
        "compile_s": round(compile_s, 1),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "notes": notes + sharding_notes,
    }


def print_report(r: dict) -> None:
    a, c = r["per_device_analytic"], r["per_device_compiled"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(f"model {r['model']} ({r['num_params'] / 1e9:.3f}B params, {r['param_dtype']} params, {r['dtype']} "
          f"compute, scan_layers={r['scan_layers']}, remat={r['remat']}), {r['optimizer']}, loss {r['loss']}")
    print(f"mesh {mesh} on {r['devices']} devices; batch {r['batch']} in {r['microbatches']} microbatches, "
          f"L={r['seq']}, T={r['scored']}, K={r['candidates']} ({r['scoring']})")
    print(f"all devices: params {gib(r['total_param_bytes'])}, optimizer state {gib(r['total_opt_state_bytes'])}")
    print("per device, analytic from the shardings:")
    for key in ("params", "opt_state", "batch"):
        print(f"  {key:<15}{gib(a[key])}")
    print("per device, XLA memory analysis of the compiled step:")
    for key in ("arguments", "outputs", "aliased", "temporaries"):
        print(f"  {key:<15}{gib(c[key])}")
    print(f"  {'total':<15}{gib(r['per_device_bytes'])}   (arguments + outputs - aliased + temporaries)")
    if r["hbm_gib"] is not None:
        verdict = "fits" if r["fits"] else "does NOT fit"
        print(f"{verdict} in {r['hbm_gib']} GiB per device ({100 * r['hbm_fraction']:.1f}% used)")
    for note in r["notes"]:
        print(f"note: {note}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        force_host_devices(FLAGS.devices)
        cfg = FLAGS.config
        plan = plan_from_flags(cfg)
        result = measure(cfg, plan)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print_report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
