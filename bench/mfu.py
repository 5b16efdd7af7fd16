"""Train-step MFU of our Flax LLaMA on the chips jax sees: the pipeline's LM step against the chips' peak.

    python bench/mfu.py [--size=llama3.2-1b] [--batches=8,16] [--seq=2048] [--attention=own,jax] [--remat=none]
                        [--steps=10] [--warmup=2] [--dtype=bfloat16] [--devices=0] [--peak_tflops=0]
                        [--budget_s=0] [--out=mfu.json]

Each case (one attention x one remat policy x one batch size) compiles `train.make_lm_step` (forward, backward,
AdamW) as `train.jit_step` jits it, on a mesh of every device or the first `--devices` (the project's default
mesh: data 1, fsdp -1, tensor 1), with float32 parameters and optimizer state and `--dtype` compute, on random
token blocks [B, L+1]: the step `bench/throughput.py` times on CPU. MFU is MaxText's measure:

    MFU = tokens/s x FLOPs per token / (devices x one chip's peak)

with FLOPs per token by MaxText's rule (`throughput.flops_per_token`) and the peak from the chip's datasheet (dense
bfloat16; `--peak_tflops` for a chip not in `DATASHEET_TFLOPS`; the measured rate below on CPU or in float32).
The best rate of a large matmul in the run's dtype on the same chip is measured too, and the MFU against it is
printed beside. A case that runs out of device memory is reported as such and the next one runs. The per-device
memory is XLA's analysis of the compiled step (arguments + outputs - aliased + temporaries, as `bench/memory.py`
plans it). The script prints a table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import throughput  # noqa: E402
from w2s_jax import host_memory  # noqa: E402  (stdlib only: the allocator is set before jax starts)

# Dense bfloat16 TFLOP/s of one chip, from the vendors' datasheets (without sparsity), by `device_kind` substring.
DATASHEET_TFLOPS = {
    "H200": 989.4, "H100": 989.4, "A100": 312.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def datasheet_tflops(device_kind: str) -> float | None:
    """One chip's dense bfloat16 peak for a `jax.Device.device_kind` (e.g. "NVIDIA H200"), or None if unknown."""
    for name, tflops in DATASHEET_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="llama3.2-1b", help="model preset (w2s_jax/models/presets.py)")
    p.add_argument("--batches", default="8,16", help="comma-separated global batch sizes (sequences per step)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length L (blocks are [B, L+1])")
    p.add_argument("--attention", default="own,jax",
                   help="comma-separated attentions (LlamaConfig.attention: own, or jax's, cuDNN's flash on GPUs)")
    p.add_argument("--remat", default="none", help="comma-separated remat policies (LlamaConfig.remat_policy)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(throughput.DTYPES), help="compute dtype")
    p.add_argument("--scan_layers", type=int, choices=(0, 1), default=0, help="scan over the layers")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices; 0: all")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (after compilation)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="one chip's peak TFLOP/s; 0: the datasheet's for a known chip, else the measured matmul's")
    p.add_argument("--matmul_n", type=int, default=0,
                   help="side of the square matmul that measures the chip's rate; 0: 8192 (2048 on CPU)")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="start no case after this many seconds (0: no limit); the rest are rows 'not run'")
    p.add_argument("--malloc", default="default", choices=host_memory.MODES,
                   help="host allocator of the process (w2s_jax/host_memory.py; matters on CPU)")
    p.add_argument("--out", default="", help="also write the JSON here (rewritten after every case)")
    args = p.parse_args(argv)
    for name, least in (("seq", 1), ("steps", 1), ("warmup", 0), ("devices", 0), ("budget_s", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name}={getattr(args, name)}: must be at least {least}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches={args.batches!r}: expected comma-separated integers")
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batches={args.batches}: expected positive integers")
    from w2s_jax.models.llama import ATTENTIONS, REMAT_POLICIES
    from w2s_jax.models.presets import PRESETS
    if args.size not in PRESETS:
        p.error(f"--size={args.size!r}: not a preset; expected one of {', '.join(PRESETS)}")
    for name, allowed in (("attention", ATTENTIONS), ("remat", REMAT_POLICIES)):
        throughput.parse_choices(p, args, name, allowed)
    return args


def matmul_tflops(n: int, dtype: str, repeats: int = 10) -> float:
    """Best TFLOP/s of one chip on an n x n x n matmul in `dtype`, accumulated in float32."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in (0, 1))
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = min(throughput._timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e12


def compiled_bytes(compiled) -> int | None:
    """Per-device bytes of a compiled step by XLA's analysis (arguments + outputs - aliased + temporaries)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def run_case(cfg, batch: int, args, devices: int) -> dict:
    """Compile and time one case: {"step_s", "tokens_per_s", "compile_s", "memory_bytes", "loss"}."""
    import jax

    blocks = throughput.random_blocks(cfg.vocab_size, batch, args.seq)
    step_fn, state, device_batch, runtime = throughput.jax_lm_step(cfg, blocks, devices)
    t0 = time.perf_counter()
    with runtime.tracing():
        compiled = step_fn.jitted.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - t0
    carry = [state, None]  # the state, donated to each step, and its metrics

    def step():
        carry[:] = jax.block_until_ready(compiled(carry[0], device_batch))

    calls = [throughput.timed_call(step) for _ in range(args.warmup + args.steps)][args.warmup:]
    step_s = statistics.median(c["s"] for c in calls)
    return {"step_s": step_s, "samples_s": [c["s"] for c in calls], "tokens_per_s": batch * args.seq / step_s,
            "kernel_s": statistics.median(c["kernel_s"] for c in calls),
            "minor_faults": statistics.median(c["minor_faults"] for c in calls),
            "compile_s": compile_s, "memory_bytes": compiled_bytes(compiled), "loss": float(carry[1]["loss"])}


def format_table(cases: list[dict]) -> str:
    header = ("attention", "remat", "batch", "step s", "tokens/s", "TFLOP/s/chip", "MFU %", "MFU % of matmul",
              "GiB/device")
    lines = [header]
    for c in cases:
        if "error" in c:
            lines.append((c["attention"], c["remat"], str(c["batch"]), c["error"], "", "", "", "", ""))
            continue
        gib = "" if c["memory_bytes"] is None else f"{c['memory_bytes'] / 2 ** 30:.1f}"
        lines.append((c["attention"], c["remat"], str(c["batch"]), f"{c['step_s']:.4f}", f"{c['tokens_per_s']:,.0f}",
                      f"{c['tflops_per_chip']:.4g}", f"{100 * c['mfu']:.1f}", f"{100 * c['mfu_of_matmul']:.1f}", gib))
    return throughput.render_table(lines)


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    malloc = host_memory.set_host_malloc(args.malloc)  # first: it must precede jax's threads
    import jax

    from w2s_jax.models.presets import get_preset

    devices = args.devices or jax.device_count()
    kind = jax.devices()[0].device_kind
    on_cpu = jax.default_backend() == "cpu"
    measured = matmul_tflops(args.matmul_n or (2048 if on_cpu else 8192), args.dtype)
    sheet = datasheet_tflops(kind) if args.dtype == "bfloat16" else None
    peak, peak_source = ((args.peak_tflops, "--peak_tflops") if args.peak_tflops
                         else (sheet, "datasheet") if sheet else (measured, "measured matmul"))
    base = get_preset(args.size, dtype=args.dtype, scan_layers=bool(args.scan_layers))
    if args.seq > base.max_position_embeddings:
        base = base.replace(max_position_embeddings=args.seq)
    flops = throughput.flops_per_token(base, args.seq)
    print(f"{devices} x {kind} (jax {jax.__version__}, {jax.default_backend()}); peak {peak:.4g} TFLOP/s per chip "
          f"({peak_source}); measured {args.dtype} matmul {measured:.4g} TFLOP/s; host malloc: {malloc}")
    print(f"{args.size}: {base.num_params / 1e6:,.1f}M params, {flops / 1e9:.4g} GFLOP/token at L={args.seq}, "
          f"{args.dtype} compute, float32 params and AdamW state, scan_layers={bool(args.scan_layers)}", flush=True)
    cases = []
    result = {"size": args.size, "params": base.num_params, "seq": args.seq, "dtype": args.dtype,
              "scan_layers": bool(args.scan_layers), "flops_per_token": flops, "devices": devices,
              "device_kind": kind, "jax": jax.__version__, "peak_tflops": peak, "peak_source": peak_source,
              "matmul_tflops": measured, "malloc": malloc, "steps": args.steps, "warmup": args.warmup, "cases": cases}
    for attention, remat, batch in itertools.product(args.attention, args.remat, args.batches):
        case = {"attention": attention, "remat": remat, "batch": batch}
        if batch % devices:
            case["error"] = f"batch not divisible by {devices} devices"
        elif args.budget_s and time.perf_counter() - start > args.budget_s:
            case["error"] = f"not run: past --budget_s={args.budget_s:g}"
        else:
            try:
                case.update(run_case(base.replace(attention=attention, remat_policy=remat), batch, args, devices))
            except Exception as e:  # noqa: BLE001 -- only running out of memory is a result
                if not is_out_of_memory(e):
                    raise
                case["error"] = "out of memory"
            gc.collect()
        if "error" not in case:
            per_chip = case["tokens_per_s"] * flops / devices / 1e12
            case.update(tflops_per_chip=per_chip, mfu=per_chip / peak, mfu_of_matmul=per_chip / measured)
        print(f"  attention {attention}, remat {remat}, batch {batch}: "
              + (case["error"] if "error" in case else
                 f"{case['step_s']:.4f} s/step, {case['tokens_per_s']:,.0f} tokens/s, MFU "
                 f"{100 * case['mfu']:.1f}% (compiled in {case['compile_s']:.0f} s; a step: {case['kernel_s']:.2f} "
                 f"s in the kernel, {case['minor_faults']:,.0f} page faults)"), flush=True)
        cases.append(case)
        if args.out:  # after every case, so that a run stopped from outside keeps what it measured
            with open(args.out, "w") as f:
                f.write(json.dumps(result) + "\n")
    print()
    print(format_table(cases))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
