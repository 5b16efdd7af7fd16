"""Does PyTorch's step slow down the next step of ours? SmolLM2-135M's classify train step (`bench/smollm2.py`'s
train phase), timed right after a step of ours and right after a step of PyTorch's, in one process.

    python bench/after_torch.py [--pairs=5] [--malloc=default|retain] [--dtype=float32] [--out=after.json]

`bench/smollm2.py` times the two frameworks round-robin, so every step of ours follows one of PyTorch's. Here each
round calls ours, ours (timed: "after ours"), PyTorch's (timed), ours (timed: "after torch"), so the two kinds of
our step alternate under the same load, and their difference per round is paired. Each timed call also records
its kernel time and minor page faults (`throughput.timed_call`), which is what fresh host memory
costs (`w2s_jax/host_memory.py`): run it with --malloc=default and --malloc=retain.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import throughput  # noqa: E402
from w2s_jax import host_memory  # noqa: E402  (stdlib only: the allocator is set before jax starts)

KINDS = ("after ours", "torch", "after torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="rounds of (ours, ours timed, PyTorch's, ours timed)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each step first (compilation)")
    p.add_argument("--batch", type=int, default=32, help="rows per batch (bench/smollm2.py's default)")
    p.add_argument("--seq", type=int, default=64, help="padded length L")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores the process (both frameworks) uses")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both frameworks' dtype")
    p.add_argument("--malloc", default="default", choices=host_memory.MODES,
                   help="host allocator of the whole process (w2s_jax/host_memory.py)")
    p.add_argument("--out", default="", help="write the JSON of every figure here")
    args = p.parse_args(argv)
    for name in ("pairs", "batch", "seq"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: expected at least 1")
    return args


def paired_rounds(ours, theirs, pairs: int, warmup: int) -> dict:
    """{kind: [timed call per round]} for KINDS, each round calling ours, ours, theirs, ours (the last three
    timed), after `warmup` untimed calls of each; "difference_s" is after torch minus after ours, per round."""
    for _ in range(warmup):
        ours()
        theirs()
    calls = {kind: [] for kind in KINDS}
    for _ in range(pairs):
        ours()
        for kind, fn in zip(KINDS, (ours, theirs, ours)):
            calls[kind].append(throughput.timed_call(fn))
    calls["difference_s"] = [b["s"] - a["s"] for a, b in zip(calls["after ours"], calls["after torch"])]
    return calls


def _join(xs, fmt: str) -> str:
    return " ".join(format(x, fmt) for x in xs)


def summary_lines(calls: dict) -> list[str]:
    lines = []
    for kind in KINDS:
        c = calls[kind]
        median = {k: statistics.median(x[k] for x in c) for k in ("s", "kernel_s", "minor_faults")}
        lines.append(f"{kind:11s}: s {_join((x['s'] for x in c), '.2f')}; median {median['s']:.2f} s, kernel "
                     f"{median['kernel_s']:.2f} s, {median['minor_faults']:,.0f} page faults")
    d = calls["difference_s"]
    lines.append(f"after torch - after ours, per round: {_join(d, '+.2f')} s; median {statistics.median(d):+.2f} s")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    malloc = host_memory.set_host_malloc(args.malloc)  # first: it must precede jax's and torch's threads
    throughput.pin_threads(args.threads, 1)
    info = throughput.machine_info(args.threads)
    print(f"{info['cpu']}, {args.threads} threads, jax {info['jax']}, torch {info['torch']}; "
          f"malloc {malloc}; {args.dtype}", flush=True)

    from bench import smollm2
    from w2s_jax.models import convert
    cfg, params, path = smollm2.load_smollm2()
    batch = smollm2.sentiment_batch(convert.load_tokenizer(path), args.batch, args.seq)
    ours = smollm2.jax_train_step(cfg.replace(dtype=args.dtype), params, batch, smollm2.make_runtime(1))
    theirs = smollm2.torch_train_step(copy.deepcopy(smollm2.torch_model(cfg, params, args.threads)), batch,
                                      args.dtype)
    calls = paired_rounds(ours, theirs, args.pairs, args.warmup)
    for line in summary_lines(calls):
        print(line, flush=True)
    result = {"benchmark": "bench/after_torch.py", "command": " ".join(["python"] + sys.argv), "machine": info,
              "malloc": malloc, "args": vars(args), "calls": calls}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
