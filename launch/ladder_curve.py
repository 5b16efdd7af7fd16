"""Accuracy on ground truth against pretraining compute, per rung of a shipped ladder (the x-axis of the paper's plots).

    python launch/ladder_curve.py --results runs/chess_ladder/results.json --manifest data/chess/ladder/manifest.json \\
        --out docs/figures/chess_ladder_compute.png

Compute is the usual 6 x non-embedding parameters x pretraining tokens (forward and backward). Prints a markdown
table (model, parameters, steps, tokens, compute, accuracy with its 95% interval and per-seed values) and writes
the plot.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from w2s_jax import report  # noqa: E402


def rows(results, manifest):
    """(model, manifest entry, ground-truth run) for every rung that has both, smallest compute first."""
    runs = {r["model"]: r for r in report.ground_truth_runs(results)}
    found = [(name, m, runs[name]) for name, m in manifest["models"].items() if name in runs]
    return sorted(found, key=lambda x: pretrain_flops(x[1]))


def pretrain_flops(entry):
    return 6 * entry["non_embedding_params"] * entry["tokens_seen"]


def markdown(found):
    lines = ["| model | params (non-embedding) | steps | tokens | compute (FLOPs) | accuracy [95% CI] | per seed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m, run in found:
        lines.append(f"| {name} | {m['params']:,} ({m['non_embedding_params']:,}) | {m['steps']:,} | "
                     f"{m['tokens_seen']:,} | {pretrain_flops(m):.2e} | {report.format_interval(run, 'accuracy')} | "
                     f"{report.format_seeds(run)} |")
    return "\n".join(lines)


def plot(found, out, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [pretrain_flops(m) for _, m, _ in found]
    y = [run["accuracy"] for _, _, run in found]
    ax.errorbar(x, y, yerr=report.error_bars([run for _, _, run in found], "accuracy"), marker="o", capsize=3)
    for (name, _, _), xi, yi in zip(found, x, y):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, -12))
    ax.set_xscale("log")
    ax.set_xlabel("pretraining compute (6 N T, FLOPs)")
    ax.set_ylabel("test accuracy, trained on ground truth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="results.json of a run over the ladder")
    ap.add_argument("--manifest", required=True, help="the ladder's manifest.json (launch/pretrain_ladder.py)")
    ap.add_argument("--out", required=True, help="the plot (.png)")
    args = ap.parse_args(argv)
    for flag, path in (("--results", args.results), ("--manifest", args.manifest)):
        if not os.path.isfile(path):
            ap.error(f"{flag}={path}: no such file")
    with open(args.results) as f:
        results = json.load(f)
    with open(args.manifest) as f:
        manifest = json.load(f)
    found = rows(results, manifest)
    if not found:
        sys.exit(f"error: no model of {args.manifest} has a ground-truth run in {args.results}")
    print(markdown(found))
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    plot(found, args.out, f"{results['task']}: ground truth vs pretraining compute (seeds {seeds}; 95% CI)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
