"""Which hidden state, and which token, should a model's linear probe read? Measured on ground truth only.

    python launch/probe_layers.py --config=configs/sentiment.py --models=scratch,weak,mid,strong

For each model of the config, the features of the training pool at every `--stride`-th hidden state (and the last,
the final normed one), at the prompt's last token and averaged over its tokens (`probe.pooling` 'last' / 'mean'):
one forward pass per pooling. Each is scored by `--folds`-fold cross-validation of the config's probe
(`probe.train_logreg` with the `probe` settings) on half A's ground truth of each seed in `--seeds`, the data a
ground-truth model of that seed trains on: the test set is never read, so the choice can be written into the config
(`model(probe_layer=..., probe_pooling=...)`) without tuning on it. Prints a markdown table and writes it to
`<workdir>/probe_layers.md`. Models pretrained here are pretrained first, as `main.py` does, into the same workdir.
"""
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import main  # noqa: E402  (launch/main.py: the workdir, CPU devices and config checks, as a run gets them)
from w2s_jax.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", main.DEFAULT_CONFIG, "Experiment config file[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (default: as launch/main.py).")
flags.DEFINE_string("models", "", "Comma-separated models of the config (default: all).")
flags.DEFINE_integer("stride", 2, "Score every stride-th hidden state (0 is the embeddings), and the last.",
                     lower_bound=1)
flags.DEFINE_string("seeds", "0,1", "Seeds whose half A is cross-validated.")
flags.DEFINE_integer("folds", 5, "Cross-validation folds.", lower_bound=2)


def scores(exp, model: str, stride: int, seeds: list[int], folds: int) -> list[tuple[int, str, float, list]]:
    """(layer, pooling, mean cross-validated accuracy, per seed) for every layer scored of `model`."""
    import numpy as np
    from w2s_jax import pipeline, probe
    lcfg, params = exp.load_model(model)
    n = lcfg.num_hidden_layers
    layers = sorted(set(range(0, n + 1, stride)) | {n})
    labels = np.array([ex["label"] for ex in exp.train])
    p = exp.cfg.probe
    fit = dict(l2=p.l2, lr=p.lr, epochs=p.epochs, batch_size=p.batch_size)
    halves_a = [pipeline.split_halves(exp.train, seed)[0] for seed in seeds]
    out = []
    for pooling in probe.POOLINGS:
        feats = probe.extract_layer_features(lcfg, params, exp.enc["train"], layers, exp.runtime,
                                             exp.cfg.eval.batch_size, pooling)
        for layer, f in zip(layers, feats):
            per_seed = [probe.cross_val_accuracy(f[a], labels[a], folds, seed, **fit)
                        for seed, a in zip(seeds, halves_a)]
            out.append((layer, pooling, float(np.mean(per_seed)), per_seed))
            print(f"{model} layer {layer} {pooling}: {np.mean(per_seed):.3f}", flush=True)
    return out


def markdown(results: dict, seeds: list[int], folds: int) -> str:
    lines = [f"Cross-validated accuracy ({folds} folds) on half A's ground truth, seeds {seeds}; "
             "layer n is the final normed state; best per model in bold.", "",
             "| model | layer | last token | mean over the prompt | per seed (last / mean) |", "|---|---:|---:|---:|---|"]
    for model, rows in results.items():
        best = max(r[2] for r in rows)
        by_layer = {}
        for layer, pooling, acc, per_seed in rows:
            by_layer.setdefault(layer, {})[pooling] = (acc, per_seed)
        for layer, cell in sorted(by_layer.items()):
            fmt = lambda acc: f"**{acc:.3f}**" if acc == best else f"{acc:.3f}"
            per = " / ".join(" ".join(f"{a:.3f}" for a in cell[k][1]) for k in ("last", "mean"))
            lines.append(f"| {model} | {layer} | {fmt(cell['last'][0])} | {fmt(cell['mean'][0])} | {per} |")
    return "\n".join(lines) + "\n"


def run(argv):
    del argv
    cfg = FLAGS.config
    workdir = FLAGS.workdir or main.default_workdir(cfg)
    logging.getLogger().setLevel(logging.WARNING)  # libraries (orbax, absl) stay quiet, as in main.py
    logging.getLogger("w2s_jax").setLevel(logging.INFO)
    os.environ["XLA_FLAGS"] = main.cpu_device_flags(os.environ.get("XLA_FLAGS", ""), cfg.get("cpu_devices", 0),
                                                    os.cpu_count() or 1)
    main.validate(cfg)
    from w2s_jax import pipeline
    try:
        seeds = pipeline.parse_seeds(FLAGS.seeds)
    except UserError:
        raise UserError(f"--seeds={FLAGS.seeds!r}: expected comma-separated integers such as '0,1'") from None
    models = pipeline.parse_list(FLAGS.models)
    unknown = [m for m in models if m not in cfg.models]
    if unknown:
        raise UserError(f"--models: unknown model(s) {unknown}; the config has {sorted(cfg.models)}")
    exp = pipeline.Experiment(cfg, workdir)
    exp.prepare_data()
    results = {}
    for model in models or exp.ladder():
        exp.ensure_model(model)
        results[model] = scores(exp, model, FLAGS.stride, seeds, FLAGS.folds)
    table = markdown(results, seeds, FLAGS.folds)
    print(table)
    with open(os.path.join(workdir, "probe_layers.md"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    try:
        app.run(run)
    except UserError as e:  # one line and exit status 2, as launch/main.py ends a mistake in the input
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
