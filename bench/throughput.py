"""Train-step throughput and MFU of our Flax LLaMA against transformers' PyTorch LlamaForCausalLM, on this machine.

    python bench/throughput.py [--sizes=bench-4m,bench-27m] [--seq=256] [--batch=8] [--steps=5] [--threads=2]
                               [--dtypes=float32,bfloat16] [--devices=1]

One run measures, on the same machine and with the same thread count:
  * the matmul peaks (the MFU denominators): the best FLOP/s of a large float32 matmul in numpy, jax and torch, and
    of a bfloat16 one (float32 accumulation) in jax and torch;
  * ours: `make_lm_step` (forward + backward + AdamW) jitted by `jit_step`, once per compute dtype in --dtypes
    (float32 parameters and optimizer state in both; `bfloat16` is the model config's `dtype`, i.e. mixed
    precision), on a 1-device mesh and on any other virtual-device count in --devices (the batch sharded over
    them, the project's default `fsdp=-1` mesh);
  * PyTorch: transformers' `LlamaForCausalLM` at the same config (`convert.config_to_hf`), eager mode, the same
    [B, L+1] blocks and next-token loss, `torch.optim.AdamW(fused=True)`, `torch.set_num_threads(--threads)`, in
    float32 (its default, the "vs torch" baseline) and, with `bfloat16` in --torch_dtypes, under
    `torch.autocast("cpu", torch.bfloat16)` (PyTorch's own mixed precision: float32 weights, bfloat16 matmuls).
Tokens per step are B * L (the predicted positions). FLOPs per token follow MaxText:
    6 * non-embedding params  +  6 * layers * (heads * head_dim) * L   (causal attention: 12 * layers * h * L / 2)
    +  6 * hidden * vocab      (the LM head)
Warm-up steps (compilation included) are excluded; the timed steps of the models go round-robin and each figure is
the median of its timed steps. The script prints a table and, last, one JSON line with every number.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from w2s_jax import host_memory  # noqa: E402  (stdlib only: the allocator is set before jax starts)

DTYPES = {"float32": "f32", "bfloat16": "bf16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="bench-4m,bench-27m", help="comma-separated presets (w2s_jax/models/presets.py)")
    p.add_argument("--seq", type=int, default=256, help="sequence length L (blocks are [B, L+1])")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores both frameworks may use")
    p.add_argument("--devices", default="1",
                   help="comma-separated virtual CPU device counts for our model (e.g. 1,2)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of our model")
    p.add_argument("--torch_dtypes", default="float32,bfloat16",
                   help="PyTorch runs: float32 (the baseline) and/or bfloat16 (autocast)")
    p.add_argument("--frameworks", default="jax,torch", help="which of jax,torch to run")
    p.add_argument("--malloc", default="default", choices=host_memory.MODES,
                   help="host allocator of the whole process, so of both frameworks: glibc's default, freed memory "
                        "retained, or huge pages (w2s_jax/host_memory.py; launch/main.py's --config.host_malloc)")
    p.add_argument("--onednn", type=int, choices=(0, 1), default=1,
                   help="ours: projections through oneDNN where usable (models/onednn.py), or XLA's dot (0)")
    p.add_argument("--scan_layers", type=int, choices=(0, 1), default=None,
                   help="override the preset's scan_layers for our model (default: the preset's)")
    args = p.parse_args(argv)
    check_run_args(p, args, ("seq", "batch", "steps"), args.devices)
    for name in ("dtypes", "torch_dtypes"):
        parse_choices(p, args, name, DTYPES)
    bad = [d for d in args.devices if d < 1 or args.batch % d]
    if bad:
        p.error(f"--devices: {bad} do not divide --batch={args.batch} into equal per-device batches")
    return args


def pin_threads(threads: int, devices: int) -> None:
    """Restrict this process (and so XLA's and PyTorch's thread pools) to `threads` cores and give XLA `devices`
    virtual CPU devices. Must run before jax is imported."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(cores):
        raise ValueError(f"--threads={threads}: this machine lets the process use {len(cores)} cores")
    os.sched_setaffinity(0, cores[:threads])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()


# ------------------------------------------------------------------------------------------------ accounting
def flops_per_token(cfg, seq: int) -> int:
    """Training FLOPs per token (MaxText's rule; forward + backward = 3x forward)."""
    weights = 6 * cfg.num_non_embedding_params
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq  # causal: half of 12
    lm_head = 6 * cfg.hidden_size * cfg.vocab_size
    return weights + attention + lm_head


def timed_call(fn) -> dict:
    """One blocking call's wall seconds ("s"), process CPU seconds ("cpu_s"), the part of those in the kernel
    ("kernel_s") and its minor page faults: what fresh host memory costs a step (w2s_jax/host_memory.py)."""
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    fn()
    t1, c1, r1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    return {"s": t1 - t0, "cpu_s": c1 - c0, "kernel_s": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt}


def median_times(steps_by_name: dict, warmup: int, steps: int, timer=timed_call) -> dict:
    """{name: {"s", "cpu_s", "kernel_s", "minor_faults"}}: the medians per call (`timed_call`) of the step
    functions, each of which blocks until its work is done, and "samples_s": the timed calls' wall seconds in order.

    After `warmup` untimed calls of each, the timed calls go round-robin (one step of each model in turn), so a
    change in the machine's load hits every model alike. CPU time (all threads) shows the work done; wall time
    what a user waits. `timer(step)` gives a call's figures (a step run in another process times itself).
    """
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    calls = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            calls[name].append(timer(step))
    return {name: {**{k: statistics.median(call[k] for call in c) for k in c[0]},
                   "samples_s": [call["s"] for call in c]} for name, c in calls.items()}


def random_blocks(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)


# ------------------------------------------------------------------------------------------------ matmul peak
def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Best matmul FLOP/s on an n x n product (max over repeats): {dtype: {library: FLOP/s, "peak": the best}}.

    float32: numpy, jax and torch; bfloat16 (float32 accumulation, the form both frameworks' mixed precision
    uses): jax and torch. On a CPU with AMX the bfloat16 peak is several times the float32 one.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    flops = 2 * n ** 3

    def best(fn):
        fn()
        return max(flops / _timed(fn) for _ in range(repeats))

    peaks = {}
    for dtype in ("float32", "bfloat16"):
        ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        jmatmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        ta, tb = torch.from_numpy(a).to(getattr(torch, dtype)), torch.from_numpy(b).to(getattr(torch, dtype))
        row = {"jax": best(lambda: jmatmul(ja, jb).block_until_ready()), "torch": best(lambda: ta @ tb)}
        if dtype == "float32":
            row["numpy"] = best(lambda: a @ b)
        row["peak"] = max(row.values())
        peaks[dtype] = row
    return peaks


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ the two steps
def jax_lm_step(cfg, blocks, devices: int):
    """(jitted step, initial state, device batch, runtime) of our LM train step on a mesh of the first `devices`
    devices (the project's default mesh: data 1, fsdp -1, tensor 1); the step donates the state."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from w2s_jax import train
    from w2s_jax.models.llama import LlamaForCausalLM

    if jax.device_count() < devices:
        raise ValueError(f"--devices={devices}: jax sees {jax.device_count()} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    runtime = train.make_runtime({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.devices()[:devices])
    tx = optax.adamw(1e-4, weight_decay=0.01)
    params = nn.meta.unbox(LlamaForCausalLM(cfg).init(jax.random.key(0), jnp.asarray(blocks[:1, :-1]))["params"])
    _, shardings = train.state_shardings(cfg, None, tx, runtime)
    state = train.create_state({"lm": params}, tx, shardings)
    step_fn = train.jit_step(train.make_lm_step(cfg, tx), shardings, runtime)
    return step_fn, state, runtime.put_batch({"blocks": blocks}), runtime


def jax_train_step(cfg, blocks, devices: int):
    """Our jitted LM train step (`jax_lm_step`) as a blocking no-argument function; each step feeds the next."""
    import jax

    step_fn, state, batch, _ = jax_lm_step(cfg, blocks, devices)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    return step


def torch_train_step(cfg, blocks, threads: int, dtype: str = "float32"):
    """transformers' LlamaForCausalLM train step as a no-argument function: eager mode, the default attention
    (SDPA), AdamW with `fused=True` (PyTorch's fastest AdamW on CPU, so the baseline is not handicapped). The
    weights are float32; `dtype="bfloat16"` runs forward and backward under CPU autocast to bfloat16."""
    import contextlib

    import torch
    import torch.nn.functional as F
    import transformers

    from w2s_jax.models.convert import config_to_hf

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = config_to_hf(cfg.replace(dtype="float32", param_dtype="float32"))
    hf["use_cache"] = False
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    tokens = torch.from_numpy(blocks.astype("int64"))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext

    def step():
        with autocast():
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------------ report
def machine_info(threads: int) -> dict:
    import jax
    import torch
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "jax": jax.__version__, "torch": torch.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def render_table(lines: list[tuple]) -> str:
    """Rows of cells (the first the header) as aligned text columns, a rule under the header."""
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def format_table(rows: list[dict]) -> str:
    header = ("size", "params", "GFLOP/token", "model", "step s", "CPU s/step", "tokens/s", "MFU %", "vs torch/f32",
              "vs torch/bf16")
    lines = [header]
    for r in rows:
        for name, run in r["runs"].items():
            ratios = [r.get("speedup_vs", {}).get(base, {}).get(name) for base in ("torch/f32", "torch/bf16")]
            lines.append((r["size"], f"{r['params'] / 1e6:.1f}M", f"{r['flops_per_token'] / 1e9:.3f}", name,
                          f"{run['step_s']:.3f}", f"{run['cpu_s']:.3f}", f"{run['tokens_per_s']:,.0f}",
                          f"{100 * run['mfu']:.1f}", *(f"{x:.2f}x" if x else "" for x in ratios)))
    return render_table(lines)


def size_case(size: str, args):
    """(result row, config, token blocks) of one preset; both models train on the same blocks."""
    from w2s_jax.models.presets import get_preset

    overrides = {} if args.scan_layers is None else {"scan_layers": bool(args.scan_layers)}
    cfg = get_preset(size, **overrides)
    if args.seq > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq)
    row = {"size": size, "params": cfg.num_params, "flops_per_token": flops_per_token(cfg, args.seq),
           "batch": args.batch, "seq": args.seq, "runs": {}}
    return row, cfg, random_blocks(cfg.vocab_size, args.batch, args.seq)


def parse_choices(p: argparse.ArgumentParser, args, name: str, allowed) -> None:
    """Turn `args.<name>`, comma-separated, into a list of values from `allowed`; anything else, or nothing at all,
    is the parser's one-line error."""
    values = [v for v in getattr(args, name).split(",") if v]
    unknown = sorted(set(values) - set(allowed))
    if unknown or not values:
        p.error(f"--{name}: {f'unknown {unknown}' if unknown else 'nothing given'}; expected some of "
                f"{', '.join(allowed)}")
    setattr(args, name, values)


def check_run_args(p: argparse.ArgumentParser, args, positive, devices: str) -> None:
    """The checks every bench makes of its flags: sizes at least 1, --warmup 0 or more, and --devices (`devices`,
    comma-separated) parsed into `args.devices`, sorted; a bad value is the parser's one-line error."""
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup}: must be 0 or more")
    try:
        args.devices = sorted({int(d) for d in devices.split(",") if d})
    except ValueError:
        p.error(f"--devices={devices!r}: expected comma-separated integers")


def main(argv=None) -> dict:
    args = parse_args(argv)
    malloc = host_memory.set_host_malloc(args.malloc)  # first: it must precede jax's and torch's threads
    print(f"host malloc: {malloc} (--malloc={args.malloc})")
    pin_threads(args.threads, max(args.devices))
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = sorted(set(frameworks) - {"jax", "torch"})
    if unknown:
        raise ValueError(f"--frameworks: unknown {unknown}; expected jax and/or torch")
    load_before = os.getloadavg()
    info = machine_info(args.threads)
    from w2s_jax.models import onednn
    onednn.ENABLED = bool(args.onednn)
    peak = matmul_peak()
    for dtype, row in peak.items():
        print(f"matmul peak ({dtype}, 2048^3): " + ", ".join(f"{lib} {flops / 1e9:.1f}" for lib, flops in row.items())
              + " GFLOP/s", flush=True)
    cases = [size_case(size, args) for size in args.sizes.split(",") if size]
    rows = [row for row, _, _ in cases]
    tokens = args.batch * args.seq
    for row, cfg, blocks in cases:
        steps, dtypes = {}, {}
        if "jax" in frameworks:
            for dtype in args.dtypes:
                for d in args.devices:
                    name = f"jax/{DTYPES[dtype]}" + (f"/{d}dev" if d > 1 else "")
                    steps[name], dtypes[name] = jax_train_step(cfg.replace(dtype=dtype), blocks, d), dtype
        if "torch" in frameworks:
            for dtype in args.torch_dtypes:
                name = f"torch/{DTYPES[dtype]}"
                steps[name], dtypes[name] = torch_train_step(cfg, blocks, args.threads, dtype), dtype
        for name, m in median_times(steps, args.warmup, args.steps).items():
            tps = tokens / m["s"]
            row["runs"][name] = {"step_s": m["s"], "cpu_s": m["cpu_s"], "kernel_s": m["kernel_s"],
                                 "minor_faults": m["minor_faults"], "tokens_per_s": tps, "dtype": dtypes[name],
                                 "mfu": tps * row["flops_per_token"] / peak[dtypes[name]]["peak"]}
            print(f"  {row['size']} {name}: {m['s']:.3f} s/step ({m['cpu_s']:.3f} CPU s, {m['kernel_s']:.3f} in the "
                  f"kernel, {m['minor_faults']:,.0f} page faults), {tps:,.0f} tokens/s", flush=True)
        row["speedup_vs"] = {base: {name: r["tokens_per_s"] / row["runs"][base]["tokens_per_s"]
                                    for name, r in row["runs"].items() if not name.startswith("torch")}
                             for base in row["runs"] if base.startswith("torch")}
    result = {"machine": info, "malloc": malloc, "onednn": args.onednn,
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "matmul_peak_flops": peak, "steps": args.steps, "warmup": args.warmup, "devices": args.devices,
              "results": rows}
    print()
    print(format_table(rows))
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {result['load_avg_after'][0]:.2f} {result['load_avg_after'][1]:.2f} "
          f"{result['load_avg_after'][2]:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
