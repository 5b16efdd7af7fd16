"""Training: optimizer, sharded jit train steps, and a resumable, preemption-safe training loop.

One loop (`run_loop`) serves every kind of training (LM pretraining, ground truth, weak-to-strong students); what
differs is the step function. The loop checkpoints with orbax, resumes from the last checkpoint with exactly the
same batches (the data order is a pure function of the step), and turns SIGTERM / Ctrl-C into "save, then stop".
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from w2s_jax import losses as losses_lib
from w2s_jax import parallel
from w2s_jax.models import heads
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after a checkpoint was written because the process was asked to stop (SIGTERM, Ctrl-C)."""


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


# ------------------------------------------------------------------------------------------------ parallel context
@dataclasses.dataclass
class Runtime:
    """The mesh and logical-axis rules every jitted function of a run is traced under."""
    mesh: jax.sharding.Mesh
    rules: tuple

    @contextlib.contextmanager
    def tracing(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    @property
    def batch_sharding(self) -> NamedSharding:
        return parallel.batch_sharding(self.mesh, self.rules)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put_batch(self, batch: dict) -> dict:
        """Host batch (the full global batch, identical on every process) -> global arrays sharded on the batch dim.

        Each process hands over only the rows its devices hold (`make_array_from_process_local_data`).
        """
        sharding = self.batch_sharding
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)

        def one(x):
            idx = sharding.addressable_devices_indices_map(x.shape)
            rows = sorted({(s[0].start or 0, s[0].stop or x.shape[0]) for s in idx.values()})
            lo, hi = rows[0][0], rows[-1][1]
            return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)
        return jax.tree.map(one, batch)


def to_host(x) -> np.ndarray:
    """A replicated global array as numpy on every process (multi-host arrays are not fully addressable)."""
    return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def barrier(name: str) -> None:
    """Wait for every process (after process 0 wrote files that all of them read next)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def make_runtime(mesh_cfg=None, rules=None, devices=None, batches=()) -> Runtime:
    """The runtime for a mesh config; `batches` (see `config_batches`) fit a -1 batch axis to the run's batches."""
    rules = parallel.resolve_rules(rules)
    return Runtime(parallel.make_mesh(mesh_cfg, devices, batches, parallel.batch_axes(rules)), rules)


def config_batches(cfg) -> list[parallel.Batch]:
    """Every batch a run of the experiment config splits over the mesh: training, evaluation (also feature
    extraction and generation), and pretraining or generative finetuning where they run."""
    def batch(section):
        c = cfg[section]
        return parallel.Batch(int(c.batch_size), int(c.get("microbatches", 1) or 1), f"{section}.batch_size",
                              f"{section}.microbatches")

    out = [batch("train"), batch("eval")]
    if any(m.get("source") == "pretrain" for m in cfg.models.values()):
        out.append(batch("pretrain"))
    if "genft" in [m.strip() for m in cfg.experiment.get("methods", "").split(",")]:
        out.append(batch("genft"))
    return out


# ------------------------------------------------------------------------------------------------ optimizer
def make_optimizer(tcfg, total_steps: int, lr: float) -> optax.GradientTransformation:
    """Adam/AdamW with a cosine (to 0, the reference's default) or constant schedule and optional linear warm-up."""
    warmup = int(tcfg.get("warmup_steps", 0))
    if tcfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    elif tcfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"train.schedule={tcfg.schedule!r}: expected 'cosine' or 'constant'")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup]) if warmup else decay
    if tcfg.optimizer == "adam":
        opt = optax.adam(schedule)
    elif tcfg.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=float(tcfg.get("weight_decay", 0.0)))
    else:
        raise ValueError(f"train.optimizer={tcfg.optimizer!r}: expected 'adam' or 'adamw'")
    clip = float(tcfg.get("grad_clip", 0.0))
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


# ------------------------------------------------------------------------------------------------ state + shardings
def abstract_lm_params(cfg: LlamaConfig):
    """Boxed ShapeDtypeStructs of the LLaMA params (logical names attached), without allocating anything."""
    return parallel.abstract_params(LlamaForCausalLM(cfg), jnp.zeros((1, 8), jnp.int32))


def lm_param_shardings(cfg: LlamaConfig, runtime: Runtime):
    """NamedSharding tree of the (unboxed) LLaMA params on the runtime's mesh."""
    boxed = abstract_lm_params(cfg)
    return parallel.logical_to_mesh_sharding(nn.get_partition_spec(boxed), runtime.mesh, runtime.rules,
                                             shapes=nn.meta.unbox(boxed))


def state_shardings(cfg: LlamaConfig, head_params, tx, runtime: Runtime, lm_keys=None):
    """(abstract unboxed TrainState, its NamedSharding tree) for params {'lm', 'head'} and the optimizer state.
    `lm_keys`: the LLaMA's top-level parameters that are there (None: all; a top-layers model has no embedding)."""
    boxed = {"lm": abstract_lm_params(cfg)}
    if lm_keys is not None:
        boxed["lm"] = {k: v for k, v in boxed["lm"].items() if k in lm_keys}
    if head_params is not None:
        boxed["head"] = {"kernel": nn.Partitioned(jax.ShapeDtypeStruct(head_params["kernel"].shape,
                                                                       head_params["kernel"].dtype),
                                                  names=heads.HEAD_LOGICAL_AXES["kernel"])}
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
                             opt_state=jax.eval_shape(tx.init, boxed))
    abstract = nn.meta.unbox(boxed_state)
    shardings = parallel.logical_to_mesh_sharding(nn.get_partition_spec(boxed_state), runtime.mesh, runtime.rules,
                                                  shapes=abstract)
    return abstract, shardings


def create_state(params, tx, shardings) -> TrainState:
    params = jax.device_put(params, shardings.params, may_alias=False)  # the step donates the state
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def _apply_grads(state: TrainState, tx, grads) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def _split_micro(batch, n: int):
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


# ------------------------------------------------------------------------------------------------ step functions
def accumulate_grads(loss_fn, params, parts):
    """(values [n], summed gradients) of `loss_fn(params, part)` over the leading axis of `parts`, one part at a
    time (lax.scan), so that only one microbatch's activations are alive."""
    def body(g_sum, part):
        v, g = jax.value_and_grad(loss_fn)(params, part)
        return jax.tree.map(jnp.add, g_sum, g), v
    grads, values = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), parts)
    return values, grads


def choice_loss_and_grads(score: Callable, params, batch, loss: losses_lib.Loss, step_frac, microbatches: int = 1):
    """(loss, gradients, logits) of `loss` over the FULL batch, where `score(params, batch) -> [B, K] logits`.

    Every loss here is cross-entropy against stop-gradient targets built from the whole batch (see losses.py), so
    with microbatches all logits come first (no gradient), the targets and row weights are built once from them,
    and each microbatch adds its rows' share, sum_i w_i CE_i / sum_batch w_i. Padding rows weigh 0 in both sums,
    as in `weighted_xent`, so a ragged batch gives the same numbers as without microbatches.
    """
    mask = batch["cand_mask"]
    if microbatches == 1:
        def loss_fn(p):
            logits = score(p, batch)
            tgt, w = loss.make_targets(jax.lax.stop_gradient(logits), batch["targets"], step_frac, mask)
            return losses_lib.weighted_xent(logits, tgt, w, mask), logits
        (value, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return value, grads, logits
    logits = jax.lax.map(lambda b: score(params, b), _split_micro(batch, microbatches)).reshape(mask.shape)
    tgt, w = loss.make_targets(logits, batch["targets"], step_frac, mask)
    tgt, w = jax.lax.stop_gradient((tgt, losses_lib.row_weights(w, mask)))
    total = jnp.sum(w)
    total = jnp.where(total > 0, total, 1.0)  # all weights 0: loss and gradient 0, as weighted_xent

    def part_loss(p, part):
        ce = losses_lib.per_example_xent(score(p, part["b"]), part["t"], part["b"]["cand_mask"])
        return jnp.sum(part["w"] * ce) / total

    values, grads = accumulate_grads(part_loss, params, _split_micro({"b": batch, "t": tgt, "w": w}, microbatches))
    return values.sum(), grads, logits


def make_choice_step(cfg: LlamaConfig, scoring: str, loss: losses_lib.Loss, tx, total_steps: int,
                     microbatches: int = 1):
    """Train step for candidate scoring with a (possibly self-referential) loss over the full batch (see
    `choice_loss_and_grads`); train_accuracy counts the real rows only."""

    def step_fn(state: TrainState, batch):
        step_frac = state.step.astype(jnp.float32) / total_steps
        score = lambda p, b: heads.candidate_logits(cfg, p, b, scoring)
        value, grads, logits = choice_loss_and_grads(score, state.params, batch, loss, step_frac, microbatches)
        real = jnp.any(batch["cand_mask"], axis=-1)
        correct = (jnp.argmax(logits, -1) == jnp.argmax(batch["targets"], -1)) & real
        acc = jnp.sum(correct) / jnp.maximum(jnp.sum(real), 1)
        metrics = {"loss": value, "train_accuracy": acc, "grad_norm": optax.tree.norm(grads)}
        return _apply_grads(state, tx, grads), metrics

    return step_fn


def make_lm_step(cfg: LlamaConfig, tx, microbatches: int = 1):
    """Next-token training step on [B, L+1] token blocks; params are {'lm': ...}. Microbatches average gradients
    (every block is full, so each microbatch's mean weighs the same)."""

    def step_fn(state: TrainState, batch):
        loss_fn = lambda p, blocks: heads.lm_loss(cfg, p["lm"], blocks)
        if microbatches == 1:
            value, grads = jax.value_and_grad(loss_fn)(state.params, batch["blocks"])
        else:
            values, grads = accumulate_grads(loss_fn, state.params, _split_micro(batch["blocks"], microbatches))
            grads = jax.tree.map(lambda g: g / microbatches, grads)
            value = values.mean()
        return _apply_grads(state, tx, grads), {"loss": value, "grad_norm": optax.tree.norm(grads)}

    return step_fn


def jit_step(step_fn, shardings, runtime: Runtime):
    """The train step as one jit with explicit in/out shardings and the state donated."""
    jitted = jax.jit(step_fn, in_shardings=(shardings, runtime.batch_sharding),
                     out_shardings=(shardings, runtime.replicated), donate_argnums=0)

    def run(state, batch):
        with runtime.tracing():
            return jitted(state, batch)
    run.jitted = jitted  # for .lower() (bench/memory.py)
    return run


def make_predict_fn(cfg: LlamaConfig, scoring: str, runtime: Runtime, param_shardings):
    """Jitted candidate logits for a host batch; returns a numpy [B, K] array on every process."""
    jitted = jax.jit(lambda p, b: heads.candidate_logits(cfg, p, b, scoring),
                     in_shardings=(param_shardings, runtime.batch_sharding), out_shardings=runtime.replicated)

    def run(params, host_batch):
        with runtime.tracing():
            return to_host(jitted(params, runtime.put_batch(host_batch)))
    return run


# ------------------------------------------------------------------------------------------------ the loop
@contextlib.contextmanager
def stop_requests():
    """Turn SIGTERM (a TPU preemption) and SIGINT (Ctrl-C) into a flag checked between steps."""
    flag = {"stop": None}
    previous = {}

    def handler(signum, frame):
        flag["stop"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def checkpoint_manager(directory: str, max_to_keep: int = 1) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(mngr, step: int, state, loop: dict):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
              force=True)
    mngr.wait_until_finished()


def restore_latest(mngr, abstract_state, shardings):
    """(state, loop dict) from the newest complete checkpoint, or (None, None). Restores onto the given shardings,
    so a checkpoint written on another mesh shape loads on this one."""
    for step in sorted(mngr.all_steps(), reverse=True):
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              loop=ocp.args.JsonRestore()))
        except Exception as e:  # a partial checkpoint (killed during a save): use the previous good step
            log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                            step, mngr.directory, e)
            continue
        return out.state, out.loop
    return None, None


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (so that a signal delivered to one host stops all of them together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def run_loop(*, state, abstract_state, shardings, step_fn: Callable, get_batch: Callable[[int], dict],
             num_steps: int, ckpt_dir: str, runtime: Runtime, checkpoint_every: int = 0,
             eval_fn: Optional[Callable] = None, eval_every: int = 0, writer=None, desc: str = "train"):
    """Run `num_steps` steps with checkpoints, resume and early stopping; returns (state, loop info).

    `get_batch(step)` gives the host batch for a step; `eval_fn(state) -> float` (higher is better) enables early
    stopping: the parameters of the best evaluation are restored at the end. A stop request saves and raises
    `Preempted`; a later call with the same arguments resumes from that step and ends identically.
    """
    mngr = checkpoint_manager(os.path.join(ckpt_dir, "latest"), max_to_keep=2)
    best_mngr = checkpoint_manager(os.path.join(ckpt_dir, "best")) if eval_fn else None
    loop = {"step": 0, "best_score": None, "best_step": None, "evals": []}
    restored, restored_loop = restore_latest(mngr, abstract_state, shardings)
    if restored is not None:
        state, loop = restored, restored_loop
        log.info("%s: resumed at step %d from %s", desc, loop["step"], mngr.directory)
    if writer is not None:
        writer.truncate_after(loop["step"])

    def evaluate(step):
        score = float(eval_fn(state))
        loop["evals"].append([step, score])
        if writer is not None:
            writer.write(step, {"val_score": score})
        if loop["best_score"] is None or score > loop["best_score"]:
            loop["best_score"], loop["best_step"] = score, step
            _save(best_mngr, step, state, dict(loop))

    start = int(loop["step"])
    with stop_requests() as stop, tqdm(total=num_steps, initial=start, desc=desc, leave=False,
                                       disable=jax.process_index() != 0) as bar:
        if eval_fn and start == 0 and not loop["evals"]:
            evaluate(0)
        for step in range(start, num_steps):
            state, metrics = step_fn(state, runtime.put_batch(get_batch(step)))
            metrics = {k: float(to_host(v)) for k, v in metrics.items()}
            done = step + 1
            loop["step"] = done
            if writer is not None:
                writer.write(done, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if eval_fn and eval_every and (done % eval_every == 0 or done == num_steps):
                evaluate(done)
            if (checkpoint_every and done % checkpoint_every == 0) or done == num_steps:
                _save(mngr, done, state, loop)
            if _any_process(stop["stop"] is not None):  # every process stops at the same step
                _save(mngr, done, state, loop)
                raise Preempted(f"{desc}: {stop['stop'] or 'a stop request'} received; checkpoint saved at step "
                                f"{done} in {mngr.directory}. Run the same command again to resume.")
        if num_steps == 0 or start == num_steps and mngr.latest_step() is None:
            _save(mngr, num_steps, state, loop)
    if eval_fn and loop["best_step"] is not None and loop["best_step"] != num_steps:
        best, _ = restore_latest(best_mngr, abstract_state, shardings)
        state = state.replace(params=best.params)
    return state, loop
