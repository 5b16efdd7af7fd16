"""SmolLM2-135M on this CPU: feature extraction and the classification train step, ours against transformers'
PyTorch, in float32 and bfloat16, side by side in one process (or, with --isolate=1, one process per model).

    python bench/smollm2.py [--batch=32] [--seq=64] [--rounds=5] [--warmup=2] [--threads=2] [--devices=2]
                            [--dtypes=float32,bfloat16] [--phases=features,train] [--out=results.json]
    python bench/smollm2.py --quick            # smoke run: batch 4, one warm-up call and one timed round
    python bench/smollm2.py --phases=job --layer=20 --rounds=3 --job_prompts=1000   # the pipeline's feature job
    python bench/smollm2.py --phases=features,matmul --layer=20 --devices=1          # and its kernels alone
    python bench/smollm2.py --onednn=0 --dtypes=bfloat16 --devices=1   # ours with XLA's dot, not oneDNN's matmul
    python bench/smollm2.py --isolate=1 --devices=1 --malloc=huge_pages   # each model in a process of its own

The model is the real SmolLM2-135M-Instruct GGUF file (`w2s_jax.assets.smollm2_gguf()`), dequantised once by
`convert.load_gguf` into float32 parameters; PyTorch gets the very same weights (`torch_model`). The batch is real
sentiment prompts (`configs/sentiment.py`'s task: the test split's first --batch prompts of at most --seq tokens,
SmolLM2's tokenizer, right-padded to --seq as `batching.collate` pads them), or random full-length rows with
`--data=synthetic`. Every model of a phase runs on that same batch.

  features  What the pipeline's probes compute (`probe.extract_features`): the hidden state --layer at each row's
            last prompt token, float32 [B, hidden], on the host. Ours: `probe.last_token_features_fn` jitted with
            the parameter and batch shardings exactly as `extract_features` jits it (the jit is built once here,
            where `extract_features` builds it once per call), host batch in, numpy features out. PyTorch: its
            trunk up to --layer (`torch_trunk`: the later layers cut off, as ours skips them) under
            `torch.no_grad()`, then the same gather. (Before the matmul phase was added, PyTorch ran the whole
            model here, `logits_to_keep=1`, whatever --layer was.)
  train     The pipeline's finetuning step (`pipeline.train_and_predict`): `train.make_choice_step` with
            scoring "classify" (a zero-initialised [hidden, 2] head on the last prompt token's final hidden
            state), the `xent` loss on the labels, the base config's optimizer (`train.make_optimizer`: Adam,
            lr 5e-5, cosine schedule), jitted by `train.jit_step` with the state donated. PyTorch: the trunk
            (`model.model`), the same gather and bias-free head in float32, soft-target cross-entropy, backward
            and `torch.optim.Adam(fused=True)` over the trunk and the head. Every parameter trains, in both.
  job       The features of many prompts (the sentiment test split's first --job_prompts), the whole job timed:
            ours is `probe.extract_features` as the pipeline calls it (prompts packed into rows; its forward is
            jitted once per process, so only the first round compiles, as a pipeline run compiles once);
            PyTorch's is written well (`torch_job`: length-sorted batches padded to their own longest prompt, the
            layers after --layer cut off). No warm-up; tokens/s counts prompt tokens.
  matmul    The kernels alone: each distinct projection of a decoder layer ([B*L, in] @ [in, out]: q and o
            576 -> 576, k and v 576 -> 192, gate and up 576 -> 1536, down 1536 -> 576) as one jitted call of
            ours (`llama.project`, as the model computes it: float32 accumulation, the result in the compute
            dtype, the kernel already in that dtype as `probe.frozen_params` gives it) and one PyTorch `x @ w` in
            the dtype (bfloat16 tensors, not autocast, so no weight cast is timed); each is called 30 times in a
            row after the warm-up (the median is reported), not round-robin. Reported in GFLOP/s, and as the
            seconds the features phase's layers, and the train step's (every layer, each projection three
            times: forward, input gradient, weight gradient, the gradients assumed at the forward's rate), would
            take if they did only these matmuls at these rates. With a features or train phase in the same
            run, it also prints the ceiling: PyTorch's measured time over ours doing nothing but our
            projections (for the job: over its prompt tokens), the most ours could reach with its kernels (and
            likewise with PyTorch's kernels).

Dtypes: float32 for both frameworks, and bfloat16 as each framework's mixed precision: ours with the model
config's `dtype="bfloat16"` (float32 parameters and optimizer state, bfloat16 matmuls with float32
accumulation), PyTorch under `torch.autocast("cpu", dtype=torch.bfloat16)` (float32 weights, bfloat16 matmuls).
Ours runs on a mesh of --devices virtual CPU devices (the project's default on a CPU: one per core, the batch
and the FSDP-sharded parameters split over them); PyTorch uses `torch.set_num_threads(--threads)`; the process is
pinned to --threads cores.

Timing: after --warmup untimed calls of each model (compilation included), --rounds rounds call each model of the
phase once in turn (round-robin, so a change in the machine's load hits all alike); each figure is the median.
tokens/s counts the B x L positions computed (padding included: both frameworks compute them); `real_tokens_per_s`
in the JSON counts the prompts' own tokens. The ratio of interest is ours over PyTorch in the same dtype.
With --isolate=1 each framework's models of each dtype run in a worker process of their own (this script with
`--serve`, the same arguments, one framework and one dtype), and the parent sends the calls to them in the same
round-robin order, one at a time; each worker times its own calls. In one process the models share glibc's heap
(and the frameworks one OpenMP runtime): the memory one model's step frees and hands back to the kernel is fresh
memory again for the next model's step, to be faulted in and zeroed, which on a virtual machine can cost more than
the step's compute (on the Xeon it added ~1.5 s to our bfloat16 train step of ~2.2 s: docs/BENCHMARKS.md). A
pipeline run trains one model at a time and never loads PyTorch. --malloc applies to every worker, and
--torch_malloc, if given, to PyTorch's instead (each framework with the host allocator it does best with).
The script prints a table and writes every number as JSON (--out, and a last line on stdout).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import throughput  # noqa: E402  (stdlib-only at import: jax is not started yet)
from w2s_jax import host_memory  # noqa: E402  (the same)

DTYPES = throughput.DTYPES
PHASES = ("features", "train", "job", "matmul")
MATMUL_CALLS = 30  # timed calls of each kernel in the matmul phase (median reported)
TARGET = 1.5  # the target: ours / PyTorch tokens/s in the same dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="rows per batch (the sentiment config's eval.batch_size)")
    p.add_argument("--seq", type=int, default=64, help="padded length L (prompts longer than L are skipped)")
    p.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds per phase (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each model first (compilation)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores the process (both frameworks) uses")
    p.add_argument("--devices", default=None,
                   help="comma-separated virtual CPU device counts for ours (default: --threads, one per core)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32 and/or bfloat16, for both frameworks")
    p.add_argument("--phases", default="features,train", help="features, train, job and/or matmul")
    p.add_argument("--job_prompts", type=int, default=0,
                   help="job phase: the first N sentiment test prompts (0: all 1,996)")
    p.add_argument("--frameworks", default="jax,torch", help="which of jax,torch to run")
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden state the features read (-1: the final normed one; configs/sentiment.py probes 20)")
    p.add_argument("--data", default="sentiment", choices=("sentiment", "synthetic"),
                   help="real sentiment prompts, or random full-length token rows")
    p.add_argument("--scan_layers", type=int, choices=(0, 1), default=0,
                   help="our model with nn.scan over its layers (the configs' default: 0)")
    p.add_argument("--onednn", type=int, choices=(0, 1), default=1,
                   help="ours: projections through oneDNN where usable (models/onednn.py), or XLA's dot (0)")
    p.add_argument("--malloc", default="default", choices=host_memory.MODES,
                   help="host allocator of the whole process (w2s_jax/host_memory.py)")
    p.add_argument("--torch_malloc", default="", choices=("",) + host_memory.MODES,
                   help="with --isolate=1: PyTorch's workers' host allocator (default: --malloc)")
    p.add_argument("--isolate", type=int, choices=(0, 1), default=0,
                   help="1: each framework and dtype in a process of its own, the calls still interleaved (not the "
                        "matmul phase)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a worker of --isolate=1
    p.add_argument("--out", default="", help="write the JSON of every figure here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --batch=4 --rounds=1 --warmup=1 unless given")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in (("batch", 4), ("rounds", 1), ("warmup", 1)):
            if f"--{name}" not in given:
                setattr(args, name, value)
    throughput.check_run_args(p, args, ("batch", "seq", "rounds"), args.devices or str(args.threads))
    if args.job_prompts < 0:
        p.error(f"--job_prompts={args.job_prompts}: expected a count >= 0 (0: every test prompt)")
    bad = [d for d in args.devices if d < 1 or args.batch % d]
    if bad:
        p.error(f"--devices: {bad} do not divide --batch={args.batch} into equal per-device batches")
    for name, allowed in (("dtypes", DTYPES), ("phases", PHASES), ("frameworks", ("jax", "torch"))):
        throughput.parse_choices(p, args, name, allowed)
    if args.torch_malloc and args.torch_malloc != args.malloc and not args.isolate:
        p.error(f"--torch_malloc={args.torch_malloc} needs --isolate=1: in one process both frameworks share one "
                "allocator")
    if args.isolate and "matmul" in args.phases:
        p.error("--isolate=1 runs the features, train and job phases; the matmul phase times each kernel alone, "
                "so run it without --isolate")
    return args


# ------------------------------------------------------------------------------------------------ model and data
def load_smollm2(scan_layers: bool = False):
    """(LlamaConfig, float32 params as host numpy arrays, path) of the real SmolLM2 file.

    On the host, so every model placed from them gets its own copy: a state the train step donates must not share
    a buffer with them, and `jax.device_put(..., may_alias=False)` of a single-device array onto a replicated
    multi-device sharding still reuses its buffer on the first device (jax 0.10.2)."""
    import jax
    import numpy as np

    from w2s_jax import assets
    from w2s_jax.models import convert

    path = assets.smollm2_gguf()
    cfg, params = convert.load_gguf(path, dtype="float32", param_dtype="float32", scan_layers=scan_layers)
    return cfg, jax.tree.map(np.asarray, jax.device_get(params)), path


def sentiment_batch(tokenizer, batch: int, seq: int) -> dict:
    """The first `batch` test prompts of the sentiment task with at most `seq` tokens, collated for "classify"
    (right-padded to `seq`), with one-hot targets of their labels."""
    import numpy as np

    from w2s_jax.data import batching
    from w2s_jax.data.sentiment import default_task_config, load_sentiment_task

    task = load_sentiment_task(default_task_config())
    encoded, _ = batching.encode_examples(task["test"], tokenizer, "classify", seq)
    if len(encoded) < batch:
        raise ValueError(f"only {len(encoded)} sentiment prompts have at most --seq={seq} tokens; lower --batch")
    items = encoded[:batch]
    targets = np.eye(2, dtype=np.float32)[[task["test"][it["src"]]["label"] for it in items]]
    return batching.collate(items, "classify", targets, batch_size=batch, num_candidates=2, seq_len=seq)


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict:
    """Random full-length rows in `batching.collate`'s "classify" layout, with random one-hot targets."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(3, vocab, (batch, seq)).astype(np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "last_index": np.full((batch,), seq - 1, np.int32),
            "cand_mask": np.ones((batch, 2), bool), "example_mask": np.ones((batch,), bool),
            "targets": np.eye(2, dtype=np.float32)[rng.integers(0, 2, batch)]}


def train_config():
    """The base config's finetuning section (optimizer, schedule, lr), as every task config inherits it."""
    from configs.base import get_base_config
    return get_base_config().train


def torch_model(cfg, params, threads: int):
    """transformers' LlamaForCausalLM (eager, default SDPA attention, float32) holding our `params`."""
    import jax
    import numpy as np
    import torch
    import transformers

    from w2s_jax.models import convert

    torch.set_num_threads(threads)
    hf = convert.config_to_hf(cfg.replace(dtype="float32", param_dtype="float32", scan_layers=False))
    hf["use_cache"] = False
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    host = convert._unstack_layers(jax.tree.map(np.asarray, params), cfg.num_hidden_layers)
    state = {}
    for spec in convert.tensor_specs(cfg):
        x = host
        for key in spec.flax_path:
            x = x[key]
        state[spec.hf_name] = torch.from_numpy(np.array(x.T if spec.transpose else x, np.float32, order="C"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()):
        raise RuntimeError(f"torch state dict: missing {missing}, unexpected {unexpected}")
    return model


def _autocast(dtype: str):
    import contextlib

    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def _torch_batch(batch: dict) -> dict:
    import torch
    return {"input_ids": torch.from_numpy(batch["input_ids"].astype("int64")),
            "attention_mask": torch.from_numpy(batch["attention_mask"].astype("int64")),
            "last_index": torch.from_numpy(batch["last_index"].astype("int64")),
            "cand_mask": torch.from_numpy(batch["cand_mask"]), "targets": torch.from_numpy(batch["targets"])}


# ------------------------------------------------------------------------------------------------ the steps
def make_runtime(devices: int):
    import jax

    from w2s_jax import train
    if jax.device_count() < devices:
        raise ValueError(f"--devices={devices}: jax sees {jax.device_count()} devices "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    return train.make_runtime({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.devices()[:devices])


def jax_features(cfg, params, batch: dict, layer: int, runtime):
    """Our feature extraction of one host batch as a no-argument function returning numpy [B, hidden]: the jit of
    `probe.extract_features` (same function, shardings and host transfers), built once."""
    import jax
    import jax.numpy as jnp

    from w2s_jax import parallel, probe
    from w2s_jax.data import batching
    from w2s_jax.models.llama import LlamaForCausalLM
    from w2s_jax.train import to_host

    shardings = parallel.param_shardings(LlamaForCausalLM(cfg), jnp.zeros((1, 8), jnp.int32), runtime.mesh,
                                         runtime.rules)
    placed = parallel.shard_params(probe.frozen_params(cfg, params), shardings)
    jitted = jax.jit(probe.last_token_features_fn(cfg, layer), in_shardings=(shardings, runtime.batch_sharding),
                     out_shardings=runtime.replicated)
    prompts = [ids[:m.sum()] for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    rows, length = [[i] for i in range(len(prompts))], batch["input_ids"].shape[1]
    host = batching.collate_packed(prompts, rows, length, len(rows), 1)  # one prompt a row: PyTorch's layout

    def run():
        with runtime.tracing():
            return to_host(jitted(placed, runtime.put_batch(host)))[:, 0]
    return run


def torch_features(model, batch: dict, layer: int, dtype: str):
    """PyTorch's feature extraction of the batch as a no-argument function returning numpy [B, hidden]: the trunk
    up to `layer` (`torch_trunk`: the layers after it are not computed, as in ours) at each row's last token."""
    import torch

    t = _torch_batch(batch)
    rows = torch.arange(t["input_ids"].shape[0])
    trunk = torch_trunk(model, layer)

    def run():
        with torch.no_grad(), _autocast(dtype):
            hidden = trunk(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
            return hidden[rows, t["last_index"]].float().numpy()
    return run


def job_prompts(tokenizer, limit: int) -> list[dict]:
    """The sentiment task's test prompts as the pipeline encodes them (`batching.encode_examples`), the first
    `limit` of them (0: all)."""
    from w2s_jax.data import batching
    from w2s_jax.data.sentiment import default_task_config, load_sentiment_task

    test = load_sentiment_task(default_task_config())["test"]
    encoded, _ = batching.encode_examples(test[:limit] if limit else test, tokenizer, "classify", 4096)
    return encoded


def jax_job(cfg, params, encoded: list, layer: int, runtime, batch: int):
    """The pipeline's feature extraction of every prompt, as a no-argument function: `probe.extract_features`
    itself (packed rows; the first call compiles its forward, later calls reuse it, as in a pipeline run)."""
    from w2s_jax import probe
    return lambda: probe.extract_features(cfg, params, encoded, layer, runtime, batch)


def torch_trunk(model, layer: int):
    """A copy of `model`'s LlamaModel whose `last_hidden_state` is hidden state `layer` (`probe._check_layer`'s
    indexing): the layers after it are cut off, as the JAX side skips them, and the final norm is applied only for
    the last layer."""
    import copy

    import torch
    trunk = copy.deepcopy(model.model)
    n = trunk.config.num_hidden_layers
    layer %= n + 1
    if layer < n:
        trunk.layers = trunk.layers[:layer]
        trunk.config.num_hidden_layers = layer
        trunk.norm = torch.nn.Identity()
    return trunk.eval()


def torch_job(model, encoded: list, layer: int, dtype: str, batch: int):
    """The same job in PyTorch, written as one would write it well: batches of `batch` prompts in order of length,
    each right-padded to its own longest prompt (nothing compiles, so no bucket is needed), the layers after `layer`
    cut off (`torch_trunk`), the hidden state at each prompt's last token."""
    import numpy as np
    import torch

    from w2s_jax.data import batching
    trunk = torch_trunk(model, layer)

    def run():
        out = np.zeros((len(encoded), trunk.config.hidden_size), np.float32)
        for idx, items in batching.prediction_batches(encoded, batch):
            t = _torch_batch(batching.collate(items, "classify", seq_len=max(len(it["prompt"]) for it in items)))
            with torch.no_grad(), _autocast(dtype):
                h = trunk(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
            out[idx] = h[torch.arange(len(idx)), t["last_index"]].float().numpy()
        return out
    return run


def projection_shapes(cfg) -> dict:
    """{name: (in, out)} of a decoder layer's distinct projections, and how many of each a layer has."""
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    shapes = {"q,o": ((h, q), 2), "k,v": ((h, kv), 2), "gate,up": ((h, i), 2), "down": ((i, h), 1)}
    if q != h:  # o maps the heads back to the hidden size
        shapes = {"q": ((h, q), 1), "o": ((q, h), 1), **{k: v for k, v in shapes.items() if k != "q,o"}}
    return shapes


def matmul_fns(cfg, tokens: int, dtype: str, frameworks) -> dict:
    """{"<framework>/<dtype> <name>": blocking no-argument function} timing each distinct projection of a layer
    on [tokens, in] inputs: ours as the model computes it (`llama.project`), PyTorch's `x @ w` in the dtype."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from w2s_jax.models import llama

    fns, rng = {}, np.random.default_rng(0)
    for name, ((d_in, d_out), _) in projection_shapes(cfg).items():
        x = rng.standard_normal((tokens, d_in), dtype=np.float32)
        w = rng.standard_normal((d_in, d_out), dtype=np.float32) * 0.02
        if "jax" in frameworks:
            jx, jw = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
            jitted = jax.jit(lambda a, b: llama.project(a, b, jnp.dtype(dtype)))
            fns[f"jax/{DTYPES[dtype]} {name}"] = lambda f=jitted, a=jx, b=jw: f(a, b).block_until_ready()
        if "torch" in frameworks:
            tx, tw = (torch.from_numpy(v).to(getattr(torch, dtype)) for v in (x, w))
            fns[f"torch/{DTYPES[dtype]} {name}"] = lambda a=tx, b=tw: a @ b
    return fns


def matmul_summary(cfg, runs: dict, tokens: int, layers: int) -> dict:
    """Per run: GFLOP/s; per framework and dtype: one layer's projections, `layers` of them (the features phase)
    and the train step's (all layers, each projection three times), in seconds at the measured rates."""
    shapes = projection_shapes(cfg)
    layer_s = {}
    for run, r in runs.items():
        model, name = run.split(" ")
        (d_in, d_out), count = shapes[name]
        r["gflop_s"] = 2 * tokens * d_in * d_out / r["s"] / 1e9
        layer_s[model] = layer_s.get(model, 0.0) + count * r["s"]
    return {model: {"layer_s": s, "forward_s": layers * s, "train_s": 3 * cfg.num_hidden_layers * s}
            for model, s in layer_s.items()}


def ceilings(phases: dict, job_batches: float = 0.0) -> dict:
    """{phase: {ours: {kernels: x}}}: PyTorch's measured time of a features, job or train phase over the time ours
    would take doing nothing but its projections at `kernels`' matmul rates (ours, then PyTorch's): the speed-up
    over PyTorch that no implementation reaches without faster kernels. The job's projections are the features
    phase's over `job_batches` times as many tokens (its prompt tokens, no padding)."""
    proj = phases["matmul"]["projections"]
    out = {}
    for phase, key, times in (("features", "forward_s", 1.0), ("job", "forward_s", job_batches),
                              ("train", "train_s", 1.0)):
        runs = phases.get(phase, {}).get("runs", {})
        for name in runs:
            dtype = name.split("/")[1]
            torch_run = runs.get(f"torch/{dtype}")
            if name.startswith("jax/") and torch_run is not None:
                out.setdefault(phase, {})[name] = {
                    kernels: torch_run["s"] / (times * proj[f"{kernels}/{dtype}"][key])
                    for kernels in ("jax", "torch") if f"{kernels}/{dtype}" in proj}
    return out


def jax_train_step(cfg, params, batch: dict, runtime, total_steps: int = 1000):
    """The pipeline's classify finetuning step (`pipeline.train_and_predict`) as a blocking no-argument function
    returning the step's loss; the state is donated, so each call trains on from the last."""
    import jax

    from w2s_jax import losses as losses_lib
    from w2s_jax import train
    from w2s_jax.models import heads

    tcfg = train_config()
    head = heads.init_head("classify", batch["targets"].shape[1], params, cfg, tcfg.head_init)
    tx = train.make_optimizer(tcfg, total_steps, float(tcfg.lr))
    _, shardings = train.state_shardings(cfg, head, tx, runtime)
    holder = {"state": train.create_state({"lm": params, "head": head}, tx, shardings)}
    step_fn = train.jit_step(train.make_choice_step(cfg, "classify", losses_lib.get("xent"), tx, total_steps),
                             shardings, runtime)
    placed = runtime.put_batch(batch)

    def step():
        holder["state"], metrics = step_fn(holder["state"], placed)
        jax.block_until_ready(holder["state"])
        return float(train.to_host(metrics["loss"]))
    return step


def torch_train_step(model, batch: dict, dtype: str):
    """PyTorch's counterpart of `jax_train_step` as a no-argument function returning the step's loss: the trunk
    (under autocast for bfloat16), the last prompt token's hidden state, a zero-initialised bias-free float32 head,
    soft-target cross-entropy over the real candidates, backward, fused Adam at the base config's lr."""
    import torch

    tcfg = train_config()
    t = _torch_batch(batch)
    rows = torch.arange(t["input_ids"].shape[0])
    model.train()
    head = torch.nn.Linear(model.config.hidden_size, t["targets"].shape[1], bias=False)
    torch.nn.init.zeros_(head.weight)
    opt = torch.optim.Adam(list(model.model.parameters()) + [head.weight], lr=float(tcfg.lr), fused=True)

    def step():
        with _autocast(dtype):
            hidden = model.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
        logits = head(hidden[rows, t["last_index"]].float()).masked_fill(~t["cand_mask"], -1e9)
        loss = -(t["targets"] * torch.log_softmax(logits, -1)).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


# ------------------------------------------------------------------------------------------------ measuring
def run_phase(fns: dict, warmup: int, rounds: int, tokens: int, real_tokens: int) -> dict:
    """{name: figures} of blocking no-argument functions timed round-robin (`throughput.median_times`, which keeps
    the timed calls' wall seconds in order as `samples_s`); each run also keeps its last output."""
    outputs = {}

    def keeping(name, fn):
        def call():
            outputs[name] = fn()
        return call

    timed = throughput.median_times({n: keeping(n, f) for n, f in fns.items()}, warmup, rounds)
    return with_rates(timed, outputs, tokens, real_tokens)


def with_rates(timed: dict, outputs: dict, tokens: int, real_tokens: int) -> dict:
    """`median_times`' figures per run with tokens/s (all positions, and the prompts' own) and the last output."""
    return {name: {**m, "tokens_per_s": tokens / m["s"], "real_tokens_per_s": real_tokens / m["s"],
                   "last_output": outputs.get(name)} for name, m in timed.items()}


def speedups(runs: dict) -> dict:
    """{ours: {"same_dtype": ratio to PyTorch in its dtype, "vs_torch_f32": ratio to PyTorch's float32}}."""
    out = {}
    for name, r in runs.items():
        if not name.startswith("jax/"):
            continue
        dtype = name.split("/")[1]
        same, f32 = runs.get(f"torch/{dtype}"), runs.get("torch/f32")
        out[name] = {"same_dtype": same and r["tokens_per_s"] / same["tokens_per_s"],
                     "vs_torch_f32": f32 and r["tokens_per_s"] / f32["tokens_per_s"]}
    return out


def feature_agreement(runs: dict) -> dict:
    """Max |ours - PyTorch| of the features, over max |PyTorch|, per dtype (a check that both compute the same)."""
    import numpy as np
    out = {}
    for d in DTYPES.values():
        theirs = runs.get(f"torch/{d}", {}).get("last_output")
        for name, r in runs.items():
            if name.startswith(f"jax/{d}") and theirs is not None and r.get("last_output") is not None:
                out[name] = float(np.abs(r["last_output"] - theirs).max() / np.abs(theirs).max())
    return out


def format_table(phases: dict) -> str:
    header = ("phase", "model", "s/batch", "CPU s", "kernel s", "page faults", "tokens/s", "real tokens/s",
              "vs torch same dtype", "vs torch/f32")
    lines = [header]
    for phase, res in phases.items():
        for name, r in res["runs"].items():
            sp = res["speedup"].get(name, {})
            lines.append((phase, name, f"{r['s']:.3f}", f"{r['cpu_s']:.3f}", f"{r['kernel_s']:.3f}",
                          f"{r['minor_faults']:,.0f}", f"{r['tokens_per_s']:,.0f}",
                          f"{r['real_tokens_per_s']:,.0f}",
                          *(f"{sp[k]:.2f}x" if sp.get(k) else "" for k in ("same_dtype", "vs_torch_f32"))))
    return throughput.render_table(lines)


def phase_builder(args, cfg, params, batch, job):
    """A function from a phase to its {run name: blocking no-argument function}: ours per dtype (and device
    count), then PyTorch's, in the frameworks of --frameworks; each call builds the phase's models anew."""
    import copy

    runtimes = {d: make_runtime(d) for d in args.devices} if "jax" in args.frameworks else {}
    torch_base = torch_model(cfg, params, args.threads) if "torch" in args.frameworks else None

    def jax_fn(phase, c, rt):
        if phase == "features":
            return jax_features(c, params, batch, args.layer, rt)
        if phase == "job":
            return jax_job(c, params, job, args.layer, rt, args.batch)
        return jax_train_step(c, params, batch, rt)

    def torch_fn(phase, dtype):
        if phase == "features":
            return torch_features(torch_base, batch, args.layer, dtype)
        if phase == "job":
            return torch_job(torch_base, job, args.layer, dtype, args.batch)
        return torch_train_step(copy.deepcopy(torch_base), batch, dtype)  # each optimizer trains its own copy

    def phase_fns(phase):
        fns = {}
        for dtype in args.dtypes:
            for d, rt in runtimes.items():
                fns[f"jax/{DTYPES[dtype]}" + (f"/{d}dev" if len(runtimes) > 1 else "")] = jax_fn(
                    phase, cfg.replace(dtype=dtype), rt)
            if torch_base is not None:
                fns[f"torch/{DTYPES[dtype]}"] = torch_fn(phase, dtype)
        return fns
    return phase_fns


def schedule(phase: str, args, facts: dict) -> tuple[int, int, int]:
    """(untimed warm-up calls, tokens, real tokens) of a call of a phase: a job call is the whole job, with no
    warm-up (its first round includes the compilation, as a pipeline run pays it) and prompt tokens only."""
    if phase == "job":
        return 0, facts["job"]["tokens"], facts["job"]["tokens"]
    return args.warmup, facts["batch"]["tokens"], facts["batch"]["real_tokens"]


def phase_results(phase: str, runs: dict, t0: float) -> dict:
    """A phase's runs with the speedups, the features' agreement and the last losses; prints its duration."""
    res = {"runs": runs, "speedup": speedups(runs)}
    if phase in ("features", "job"):
        res["max_rel_diff_vs_torch"] = feature_agreement(runs)
    for r in runs.values():
        out = r.pop("last_output")
        if isinstance(out, float):
            r["last_loss"] = out
    res["phase_s"] = time.perf_counter() - t0
    print(f"{phase}: {res['phase_s']:.0f} s (compilation and warm-up included)", flush=True)
    return res


def in_process_phases(args):
    """Every phase with both frameworks in this process: ({phase: results}, facts for the JSON)."""
    from w2s_jax import probe

    t_start = time.perf_counter()
    cfg, params, path, batch, job, facts = load_everything(args)
    phase_fns = phase_builder(args, cfg, params, batch, job)
    print(f"setup (loading, tokenizing, building the PyTorch model): {time.perf_counter() - t_start:.0f} s",
          flush=True)
    phases = {}
    for phase in args.phases:
        t0 = time.perf_counter()
        warmup, tokens, real_tokens = schedule(phase, args, facts)
        if phase == "matmul":
            # each kernel called MATMUL_CALLS times in a row: what the kernel can do, not how it shares the
            # process with the other models' calls (interleaved, a few-millisecond call varies 2-3x)
            fns = {k: v for d in args.dtypes for k, v in matmul_fns(cfg, tokens, d, args.frameworks).items()}
            runs = {name: run_phase({name: fn}, warmup, MATMUL_CALLS, tokens, real_tokens)[name]
                    for name, fn in fns.items()}
        else:
            runs = run_phase(phase_fns(phase), warmup, args.rounds, tokens, real_tokens)
        phases[phase] = phase_results(phase, runs, t0)
        if phase == "matmul":  # the decoder layers the features phase computes: hidden state --layer's index
            layers = probe._check_layer(cfg, args.layer)
            phases[phase].update(layers=layers, projections=matmul_summary(cfg, runs, tokens, layers))
    return phases, facts


# ------------------------------------------------------------------------------------------------ --isolate=1
REPLY = "@@reply "  # a worker's answers on its stdout start with this; its other lines are echoed


def serve(phase_fns) -> None:
    """A worker (`--serve`): answers its parent's `Worker`, one JSON line each way, until stdin closes. Asked for
    a phase, it builds that phase's models (dropping the last phase's) and names them; asked to call one, it calls
    it once and answers with `throughput.timed_call`'s figures, taken in this process; asked for the outputs, it
    gives each model's last one."""
    fns, outputs = {}, {}
    for line in sys.stdin:
        msg = json.loads(line)
        if "phase" in msg:
            fns.clear()
            outputs.clear()
            fns.update(phase_fns(msg["phase"]))
            reply = list(fns)
        elif "call" in msg:
            name = msg["call"]
            reply = throughput.timed_call(lambda: outputs.__setitem__(name, fns[name]()))
        else:
            reply = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in outputs.items()}
        print(REPLY + json.dumps(reply), flush=True)


class WorkerExited(RuntimeError):
    pass


class Worker:
    """One framework's models of one dtype in a process of their own (`--isolate=1`): this script with the same
    arguments, that framework and dtype only, and `--serve`."""

    def __init__(self, framework: str, dtype: str, malloc: str, given: list):
        import subprocess
        self.name = f"{framework}/{DTYPES[dtype]}"
        cmd = [sys.executable, os.path.abspath(__file__), *given, f"--frameworks={framework}", f"--dtypes={dtype}",
               "--isolate=0", "--serve", "--out=", f"--malloc={malloc}", "--torch_malloc="]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ready(self) -> dict:
        """Waits for the worker to load the model; the facts it loaded (`load_everything`)."""
        return self._reply()

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
            print(f"[{self.name}] {line}", end="", flush=True)
        code = self.proc.wait()
        raise WorkerExited(f"the {self.name} worker exited with code {code} before answering"
                           + (" (killed: out of memory?)" if code == -9 else "; its output is above"))

    def ask(self, msg: dict):
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it has exited: _reply says how
            pass
        return self._reply()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


def isolated_phases(args, argv):
    """Every phase with each framework and dtype in a process of its own (`--isolate=1`): ({phase: results},
    facts). The calls still go round-robin, one at a time, as in one process; but no model's process then holds
    another's memory, allocator and OpenMP threads (in one process, the pages one model's step frees are fresh
    pages again for the next one's: docs/BENCHMARKS.md)."""
    import numpy as np

    given = list(sys.argv[1:] if argv is None else argv)
    workers = {}
    try:
        for dtype in args.dtypes:  # loading their models at the same time
            for framework in args.frameworks:
                malloc = args.torch_malloc or args.malloc if framework == "torch" else args.malloc
                worker = Worker(framework, dtype, malloc, given)
                workers[worker.name] = worker
        ready = {name: w.ready() for name, w in workers.items()}
        facts = {**next(iter(ready.values())), "malloc": {name: f["malloc"] for name, f in ready.items()}}
        print(f"one process per model: {', '.join(f'{k} pid {w.proc.pid}' for k, w in workers.items())}",
              flush=True)
        phases = {}
        for phase in args.phases:
            t0 = time.perf_counter()
            names = {w: w.ask({"phase": phase}) for w in workers.values()}
            calls = {name: functools.partial(w.ask, {"call": name}) for w, ns in names.items() for name in ns}
            warmup, tokens, real_tokens = schedule(phase, args, facts)
            timed = throughput.median_times(calls, warmup, args.rounds, timer=lambda call: call())
            outputs = {k: np.asarray(v) if isinstance(v, list) else v
                       for w in workers.values() for k, v in w.ask({"outputs": True}).items()}
            runs = with_rates(timed, outputs, tokens, real_tokens)
            phases[phase] = phase_results(phase, runs, t0)
    finally:
        for w in workers.values():
            w.close()
    return phases, facts


def load_everything(args):
    """The model, the batch and the job's prompts; (cfg, params, path, batch, job, facts for the JSON)."""
    from w2s_jax.models import convert, onednn

    onednn.ENABLED = bool(args.onednn)
    onednn_state = ("n/a (ours not run)" if "jax" not in args.frameworks else "off (--onednn=0)" if not args.onednn
                    else "on" if onednn._registered() else "unavailable")
    print(f"ours, oneDNN for the projections on one device: {onednn_state}", flush=True)

    cfg, params, path = load_smollm2(bool(args.scan_layers))
    if args.data == "sentiment":
        batch = sentiment_batch(convert.load_tokenizer(path), args.batch, args.seq)
    else:
        batch = synthetic_batch(cfg.vocab_size, args.batch, args.seq)
    tokens, real_tokens = args.batch * args.seq, int(batch["attention_mask"].sum())
    print(f"SmolLM2: {cfg.num_params:,} params, {cfg.num_hidden_layers} layers; batch {args.batch} x {args.seq} "
          f"({args.data}: {real_tokens} real tokens of {tokens})", flush=True)
    job = job_prompts(convert.load_tokenizer(path), args.job_prompts) if "job" in args.phases else []
    job_tokens = sum(len(e["prompt"]) for e in job)
    if job:
        print(f"job: the features of {len(job)} sentiment test prompts ({job_tokens} tokens), layer {args.layer}",
              flush=True)
    facts = {"onednn": onednn_state,
             "model": {"path": str(path), "params": cfg.num_params, "layers": cfg.num_hidden_layers,
                       "hidden": cfg.hidden_size},
             "batch": {"rows": args.batch, "seq": args.seq, "tokens": tokens, "real_tokens": real_tokens,
                       "data": args.data},
             "job": {"prompts": len(job), "tokens": job_tokens}}
    return cfg, params, path, batch, job, facts


def main(argv=None) -> dict:
    import numpy as np

    t_start = time.perf_counter()
    args = parse_args(argv)
    malloc = host_memory.set_host_malloc(args.malloc)  # first: it must precede jax's and torch's threads
    throughput.pin_threads(args.threads, max(args.devices))
    load_before = os.getloadavg()
    info = throughput.machine_info(args.threads)
    print(f"{info['cpu']}, {args.threads} threads, jax {info['jax']}, torch {info['torch']}; "
          f"XLA_FLAGS={info['xla_flags']!r}; malloc {malloc}", flush=True)
    if args.serve:
        cfg, params, _, batch, job, facts = load_everything(args)
        print(REPLY + json.dumps({**facts, "malloc": malloc}), flush=True)
        return serve(phase_builder(args, cfg, params, batch, job))
    try:
        phases, facts = isolated_phases(args, argv) if args.isolate else in_process_phases(args)
    except WorkerExited as e:
        sys.exit(f"bench/smollm2.py --isolate=1: {e}")
    tokens, job_tokens = facts["batch"]["tokens"], facts["job"]["tokens"]
    result = {"benchmark": "bench/smollm2.py", "command": " ".join(["python"] + sys.argv), "machine": info,
              "malloc": malloc, "processes": "one per model" if args.isolate else "one", "args": vars(args),
              **facts,  # with --isolate=1, "malloc" is each worker's
              "total_s": time.perf_counter() - t_start, "load_avg_before": load_before,
              "load_avg_after": os.getloadavg(), "target": TARGET, "phases": phases}
    print()
    print(format_table(phases))
    if "matmul" in phases:
        res = phases["matmul"]
        print(f"matmul, GFLOP/s on [{tokens}, in] @ [in, out]: " + ", ".join(
            f"{name} {r['gflop_s']:,.0f}" for name, r in res["runs"].items()))
        for model, p in res["projections"].items():
            measured = {ph: phases.get(ph, {}).get("runs", {}).get(model) for ph in ("features", "train")}
            print(f"matmul {model}: one layer's projections {p['layer_s'] * 1e3:.1f} ms; at these rates the "
                  f"features phase's {res['layers']} layers {p['forward_s']:.3f} s"
                  + (f" (its forward measured {measured['features']['s']:.3f} s)" if measured["features"] else "")
                  + f", the train step's {facts['model']['layers']} x 3 {p['train_s']:.3f} s"
                  + (f" (its step measured {measured['train']['s']:.3f} s)" if measured["train"] else ""))
        res["ceiling"] = ceilings(phases, job_tokens / tokens)
        for phase, by_run in res["ceiling"].items():
            for name, c in by_run.items():
                print(f"{phase} {name}: at most " + " / ".join(f"{x:.2f}x with {k}'s kernels" for k, x in c.items())
                      + " (PyTorch's measured time over ours doing nothing but its projections)")
    for phase, res in phases.items():
        if phase == "matmul":  # the kernels are context for the phases, not the target's measure
            continue
        for name, sp in res["speedup"].items():
            if sp.get("same_dtype"):
                verdict = "meets" if sp["same_dtype"] >= TARGET else "below"
                print(f"{phase} {name}: {sp['same_dtype']:.2f}x PyTorch in the same dtype ({verdict} {TARGET}x)")
    for phase in ("features", "job"):
        if phase in phases:
            diffs = phases[phase]["max_rel_diff_vs_torch"]
            print(f"{phase}, max |ours - torch| / max |torch|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    la, lb = result["load_avg_after"], load_before
    print(f"load average (1, 5, 15 min): before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after {la[0]:.2f} {la[1]:.2f} "
          f"{la[2]:.2f}")
    text = json.dumps(result, default=lambda x: x.tolist() if isinstance(x, np.ndarray) else str(x))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
