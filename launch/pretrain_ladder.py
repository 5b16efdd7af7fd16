"""Pretrain the chess ladder once and write it as small Hugging Face checkpoints (config, weights, tokenizer).

    python launch/pretrain_ladder.py --out data/chess/ladder

It runs the pipeline's own stages (task data -> byte-level BPE tokenizer -> `Experiment.ensure_model` per model) from
`configs/chess.py:<--preset>` (default `ladder_scratch`: its models, steps, tokenizer and corpus) in `--workdir` (a
stopped run resumes there), then copies `<workdir>/models/<name>` to
`<out>/<name>` and writes `<out>/manifest.json`: the steps, seed, corpus and tokenizer digests, parameter counts and
wall times. `configs/chess.py:ladder` loads the result (`source='hf'`, `tokenizer.source='model'`) and only
finetunes. Every model shares the tokenizer that was trained on the corpus and the training puzzles' candidates.
"""
import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()


def parse_steps(spec: str) -> dict[str, int]:
    """'weak=200,mid=800' -> {'weak': 200, 'mid': 800}; a malformed item is a ValueError that names it."""
    steps = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--steps: {item!r} is not name=steps with steps a positive integer (e.g. weak=200)")
        steps[name] = int(value)
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for <name>/ checkpoints and manifest.json")
    ap.add_argument("--preset", default="ladder_scratch", help="configs/chess.py preset whose models are pretrained")
    ap.add_argument("--steps", default="", help="per-model pretraining steps overriding the preset's, e.g. "
                    "weak=5,mid=5,strong=5")
    ap.add_argument("--seed", type=int, default=0, help="config.seed: initialisation and data order")
    ap.add_argument("--workdir", default="/tmp/w2s_pretrain_ladder")
    args = ap.parse_args(argv)

    import logging
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("w2s_jax").setLevel(logging.INFO)
    import jax
    from configs.chess import get_config
    from w2s_jax import fingerprint, pipeline

    try:
        cfg = get_config(args.preset)
        steps_by_model = parse_steps(args.steps)
    except ValueError as e:
        ap.error(str(e))
    cfg.seed = args.seed
    for name, steps in steps_by_model.items():
        if name not in cfg.models:
            ap.error(f"--steps: unknown model {name!r}; models are {list(cfg.models.keys())}")
        cfg.models[name].pretrain_steps = steps
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.workdir, "jax_cache")))
    exp = pipeline.Experiment(cfg, args.workdir)
    t0 = time.time()
    exp.prepare_data()
    manifest = {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
                "preset": args.preset, "seed": args.seed, "pretrain": cfg.pretrain.to_dict(),
                "tokenizer_split": cfg.tokenizer.split,
                "corpus_games": len(exp.corpus), "corpus": fingerprint.digest(exp.corpus),
                "tokenizer": exp.digests["tokenizer"], "data_seconds": round(time.time() - t0, 1), "models": {}}
    os.makedirs(args.out, exist_ok=True)
    for name in exp.ladder():
        t = time.time()
        exp.ensure_model(name)
        lcfg = exp.model_config(name)
        dst = os.path.join(args.out, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(exp.model_dir(name), dst, ignore=shutil.ignore_patterns("fingerprint.json"))
        m = cfg.models[name]
        steps = int(m.pretrain_steps or cfg.pretrain.steps)
        manifest["models"][name] = {
            "preset": m.preset, "steps": steps, "params": lcfg.num_params,
            "non_embedding_params": lcfg.num_non_embedding_params,
            "tokens_seen": steps * cfg.pretrain.batch_size * cfg.pretrain.seq_len,
            "seconds": round(time.time() - t, 1)}  # 0-ish when the workdir already held the model
        print(f"{name}: {manifest['models'][name]}")
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
