"""The weak-to-strong experiment: stages from one config, each writing into the workdir and reused when unchanged.

Stages: task data -> tokenizer -> models (pretrained here or loaded from checkpoints) -> per seed: ground-truth
runs (every model on half A: the weak floor, the strong ceiling and the supervisors, as the reference `sweep.py`)
-> students on half B for every (supervisor, student, loss) -> bootstrapping chains -> per-seed results; then the
means over seeds with 95% intervals (stats.py) -> results.json, predictions, results.md and plots.

Splits (halves, validation carve-outs, chain slices) keep every group of examples together (chess: the puzzles of
one game), and depend only on the seed. Each stage stores a fingerprint of what determines it (its config keys and
the digests of its inputs: examples, weights, labels, tokenizer); a stage whose fingerprint changed is recomputed,
after a log line naming the keys that changed, and so is everything downstream of it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from w2s_jax import losses as losses_lib
from w2s_jax import fingerprint, metrics, report, stats, top_layers
from w2s_jax import train as train_lib
from w2s_jax.data import batching, tokenization
from w2s_jax.errors import UserError
from w2s_jax.metric_writer import MetricWriter
from w2s_jax.models import convert, heads, llama, presets

log = logging.getLogger(__name__)

GT = "ground_truth"
ASSET_CHECKPOINTS = {"smollm2": "smollm2_gguf"}  # 'asset:NAME' checkpoints -> the w2s_jax.assets function
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # model_defaults.dtype and param_dtype


# ------------------------------------------------------------------------------------------------ config helpers
def parse_chains(spec: str) -> list[list[str]]:
    """'weak->mid->strong' (comma-separated for several) -> [['weak', 'mid', 'strong']]."""
    return [[m.strip() for m in c.split("->")] for c in spec.split(",") if c.strip()]


def parse_list(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def parse_seeds(spec) -> list[int]:
    """experiment.seeds: '0,1,2' (or one int) -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in parse_list(str(spec))]
    except ValueError:
        raise UserError(f"experiment.seeds={spec!r}: expected comma-separated integers such as '0,1,2'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"experiment.seeds={spec!r}: expected one or more distinct integers such as '0,1,2'")
    return seeds


def validate_config(cfg) -> None:
    """Every problem a config can have that is visible before any data, model or compilation; one clear message."""
    problems = []
    names = list(cfg.models.keys())
    if not names:
        problems.append("config.models is empty")
    exp = cfg.experiment
    for key, spec in (("experiment.pairs", exp.pairs), ("experiment.chains", exp.chains)):
        for chain in parse_chains(spec):
            if len(chain) < 2:
                problems.append(f"{key}: {'->'.join(chain)!r} needs at least a supervisor and a student")
            for m in chain:
                if m not in names:
                    problems.append(f"{key}: unknown model {m!r} in {'->'.join(chain)!r}; models are {names}")
    for m in parse_list(exp.ground_truth):
        if m not in names:
            problems.append(f"experiment.ground_truth: unknown model {m!r}; models are {names}")
    for loss in parse_list(exp.losses) + [exp.chain_loss]:
        try:
            losses_lib.get(loss, **dict(cfg.losses.get(loss, {})))
        except ValueError as e:
            problems.append(f"experiment.losses / losses.{loss}: {e}")
    for name, m in cfg.models.items():
        for key in ("lr", "epochs"):
            if not isinstance(m.get(key, 0), (int, float)) or m.get(key, 0) < 0:
                problems.append(f"models.{name}.{key}={m.get(key)!r}: expected a number >= 0 (0: train.{key})")
        if m.source == "hf":
            if not m.checkpoint:
                problems.append(f"models.{name}.checkpoint is empty: give the path of a Hugging Face LLaMA "
                                f"directory (--config.models.{name}.checkpoint=/path/to/llama)")
            elif m.checkpoint.startswith("asset:"):
                if m.checkpoint[len("asset:"):] not in ASSET_CHECKPOINTS:
                    problems.append(f"models.{name}.checkpoint={m.checkpoint!r}: known assets are "
                                    f"{['asset:' + a for a in ASSET_CHECKPOINTS]}")
            elif convert.is_gguf(m.checkpoint) and not os.path.isfile(m.checkpoint):
                problems.append(f"models.{name}.checkpoint={m.checkpoint!r}: no such GGUF file")
            elif not convert.is_gguf(m.checkpoint) and not os.path.isfile(os.path.join(m.checkpoint, "config.json")):
                problems.append(f"models.{name}.checkpoint={m.checkpoint!r}: no config.json there (expected a "
                                "Hugging Face LLaMA directory or a .gguf file)")
        elif m.source == "pretrain":
            if m.preset not in presets.PRESETS:
                problems.append(f"models.{name}.preset={m.preset!r}: valid presets are {list(presets.PRESETS)}")
        else:
            problems.append(f"models.{name}.source={m.source!r}: expected 'pretrain' or 'hf'")
    md = cfg.model_defaults
    for key, valid in (("dtype", FLOAT_DTYPES), ("param_dtype", FLOAT_DTYPES), ("remat_policy", llama.REMAT_POLICIES),
                       ("attention", llama.ATTENTIONS)):
        if md.get(key) not in valid:
            problems.append(f"model_defaults.{key}={md.get(key)!r}: expected one of {list(valid)}")
    from w2s_jax.elicitation import METHODS
    for method in parse_list(exp.methods):
        if method not in METHODS:
            problems.append(f"experiment.methods: unknown method {method!r}; valid methods are {list(METHODS)}")
        elif method in ("probe", "finetune_probe") and cfg.task.get("scoring") == "choice_lm":
            problems.append(f"experiment.methods: {method!r} needs a fixed set of classes, but task.scoring="
                            "'choice_lm' scores a variable list of candidates (chess: the legal moves), so a linear "
                            "head over their indices means nothing")
    if "finetune_probe" in parse_list(exp.methods) and "xent" not in parse_list(exp.losses):
        problems.append("experiment.methods 'finetune_probe' probes the student finetuned with 'xent': add it to "
                        "experiment.losses")
    try:
        parse_seeds(exp.seeds)
    except UserError as e:
        problems.append(str(e))
    if exp.pair_examples not in ("all", "chain_step"):
        problems.append(f"experiment.pair_examples={exp.pair_examples!r}: expected 'all' or 'chain_step'")
    elif exp.pair_examples == "chain_step" and not parse_chains(exp.chains):
        problems.append("experiment.pair_examples='chain_step' sizes the direct pairs' data like a chain step, "
                        "but experiment.chains is empty")
    if cfg.train.method not in ("finetune", "probe"):
        problems.append(f"train.method={cfg.train.method!r}: expected 'finetune' or 'probe'")
    elif cfg.train.method == "probe":
        if cfg.task.get("scoring") != "classify":
            problems.append(f"train.method='probe' trains linear probes over a fixed set of classes; "
                            f"task.scoring={cfg.task.get('scoring')!r} is not 'classify'")
        if "finetune_probe" in parse_list(exp.methods):
            problems.append("experiment.methods 'finetune_probe' needs finetuned students: train.method='probe' "
                            "finetunes nothing")
        other = [loss for loss in parse_list(exp.losses) + [exp.chain_loss] if loss != "xent"]
        if other:
            problems.append(f"experiment.losses: train.method='probe' fits probes by cross-entropy on the soft "
                            f"labels ('xent'); {sorted(set(other))} need finetuning")
    if cfg.train.head_init not in ("zero", "unembed", "probe"):
        problems.append(f"train.head_init={cfg.train.head_init!r}: expected 'zero', 'unembed' or 'probe'")
    elif cfg.train.head_init != "zero" and cfg.task.get("scoring") != "classify":
        problems.append(f"train.head_init={cfg.train.head_init!r} starts a classification head, which needs "
                        f"task.scoring='classify', not {cfg.task.get('scoring')!r}")
    k = cfg.train.get("trainable_layers", 0)
    if not isinstance(k, int) or k < 0:
        problems.append(f"train.trainable_layers={k!r}: expected 0 (train every layer) or a positive number of top "
                        "layers")
    elif k and cfg.train.method == "finetune":
        if cfg.task.get("scoring") != "classify":
            problems.append(f"train.trainable_layers={k} finetunes the top layers on the prompt's hidden states, "
                            f"which needs task.scoring='classify', not {cfg.task.get('scoring')!r}")
        if "finetune_probe" in parse_list(exp.methods):
            problems.append(f"experiment.methods 'finetune_probe' probes the finetuned model's layer "
                            f"probe.layer, which train.trainable_layers={k} does not build: set it to 0")
    from w2s_jax.probe import check_pooling
    for key, pooling in [("probe.pooling", cfg.probe.get("pooling"))] + [
            (f"models.{name}.probe_pooling", m.probe_pooling) for name, m in cfg.models.items()
            if m.get("probe_pooling") is not None]:
        try:
            check_pooling(pooling, key)
        except ValueError as e:
            problems.append(str(e))
    for control in parse_list(exp.controls):
        if control != "random_flips":
            problems.append(f"experiment.controls: unknown control {control!r}; the valid one is 'random_flips'")
    if cfg.eval.mode not in ("rank", "greedy"):
        problems.append(f"eval.mode={cfg.eval.mode!r}: expected 'rank' or 'greedy'")
    if exp.labels not in ("soft", "hard"):
        problems.append(f"experiment.labels={exp.labels!r}: expected 'soft' or 'hard'")
    if cfg.train.early_stopping not in ("none", "weak_labels", "ground_truth_oracle"):
        problems.append(f"train.early_stopping={cfg.train.early_stopping!r}: expected 'none', 'weak_labels' or "
                        "'ground_truth_oracle'")
    for key in ("train.batch_size", "train.microbatches", "train.length_multiple", "eval.batch_size",
                "pretrain.batch_size", "pretrain.steps", "pretrain.seq_len", "task.max_len"):
        section, name = key.split(".")
        value = cfg[section].get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{key}={value!r}: expected a positive integer")
    if cfg.train.epochs <= 0:
        problems.append(f"train.epochs={cfg.train.epochs!r}: expected a positive number")
    if cfg.train.batch_size % max(1, cfg.train.microbatches):
        problems.append(f"train.batch_size={cfg.train.batch_size} is not a multiple of "
                        f"train.microbatches={cfg.train.microbatches}")
    if cfg.tokenizer.source == "train" and any(m.source == "hf" for m in cfg.models.values()):
        problems.append("tokenizer.source='train' cannot serve HF checkpoints; use tokenizer.source='model'")
    if cfg.tokenizer.get("split", "word") not in tokenization.SPLIT_PATTERNS:
        problems.append(f"tokenizer.split={cfg.tokenizer.split!r}: expected one of "
                        f"{', '.join(tokenization.SPLIT_PATTERNS)}")
    if problems:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))


def load_task(task_cfg) -> dict:
    if task_cfg.loader == "chess":
        from w2s_jax.data import chess
        return chess.load_chess_task(task_cfg)
    if task_cfg.loader == "nlp":
        from w2s_jax.data import nlp
        return nlp.load_nlp_task(task_cfg)
    if task_cfg.loader == "reward":
        from w2s_jax.data import reward
        return reward.load_reward_task(task_cfg)
    if task_cfg.loader == "sentiment":
        from w2s_jax.data import sentiment
        return sentiment.load_sentiment_task(task_cfg)
    raise UserError(f"task.loader={task_cfg.loader!r}: expected 'chess', 'nlp', 'reward' or 'sentiment'")


def group_of(example: dict) -> str:
    """The unit of dependence that splits keep together (chess: the game); an example is its own group by default."""
    return str(example.get("group") or example["id"])


def cut_at_groups(idx: list[int], groups: list[str], fractions: list[float]) -> list[list[int]]:
    """Cut `idx` (the examples of a group adjacent) into consecutive parts ending near the cumulative `fractions`
    of its length, only between groups: no group is in two parts. Returns len(fractions) + 1 parts."""
    bounds = [round(f * len(idx)) for f in fractions]
    parts, current = [], []
    for j, i in enumerate(idx):
        new_group = j > 0 and groups[i] != groups[idx[j - 1]]
        while new_group and len(parts) < len(bounds) and j >= bounds[len(parts)]:
            parts.append(current)
            current = []
            new_group = False
        current.append(i)
    parts.append(current)
    return parts + [[] for _ in range(len(bounds) + 1 - len(parts))]


def split_halves(examples: list[dict], seed: int) -> tuple[list[int], list[int]]:
    """Deterministic 50/50 split by group: half A trains the ground-truth models, half B is labelled for the
    students. Returns example indices, the examples of a group adjacent (so later cuts keep groups whole)."""
    groups = [group_of(ex) for ex in examples]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = list(members)
    order = [i for k in np.random.default_rng(seed).permutation(len(names)) for i in members[names[k]]]
    half_a, half_b = cut_at_groups(order, groups, [0.5])
    return half_a, half_b


def normalise_answer(text: str) -> str:
    """A candidate or generated text compared as an answer: whitespace and check/annotation marks dropped."""
    return text.strip().rstrip("+#!?")


def answer_keys(examples: list[dict], preds: list[int], texts: list[str] | None) -> list[str]:
    """What each prediction says, comparable across models: the chosen candidate, or for a generated text that
    matches no candidate (prediction -1), that text, so two different illegal moves do not count as agreeing."""
    keys = []
    for i, (ex, p) in enumerate(zip(examples, preds)):
        if p >= 0:
            keys.append(normalise_answer(ex["candidates"][p]))
        else:
            keys.append("unmatched:" + normalise_answer(texts[i] if texts else ""))
    return keys


def one_hot_targets(examples: list[dict]) -> list[np.ndarray]:
    out = []
    for ex in examples:
        t = np.zeros(len(ex["candidates"]), np.float32)
        t[ex["label"]] = 1.0
        out.append(t)
    return out


def stack_targets(targets: list[np.ndarray]) -> np.ndarray:
    """Targets of different lengths -> [N, K] with zeros where an example has fewer candidates."""
    out = np.zeros((len(targets), max(len(t) for t in targets)), np.float32)
    for i, t in enumerate(targets):
        out[i, :len(t)] = t
    return out


def accepts(examples: list[dict]) -> list[list[int]]:
    return [ex.get("accept", [ex["label"]]) for ex in examples]


def softmax_valid(logits: np.ndarray, k: int) -> np.ndarray:
    z = logits[:k] - logits[:k].max()
    p = np.exp(z)
    return p / p.sum()


def resolve_checkpoint(path: str) -> str:
    """A checkpoint path, with 'asset:NAME' (a model shipped through the package registry) fetched and located."""
    if not path.startswith("asset:"):
        return path
    from w2s_jax import assets
    return str(getattr(assets, ASSET_CHECKPOINTS[path[len("asset:"):]])())


# ------------------------------------------------------------------------------------------------ the experiment
class Experiment:
    def __init__(self, cfg, workdir: str):
        validate_config(cfg)
        self.cfg = cfg
        self.root = workdir  # shared by every seed: tokenizer, pretrained models, results
        self.workdir = workdir  # the current seed's folder while a seed runs (see `use_seed`)
        self.seeds = parse_seeds(cfg.experiment.seeds)
        self.seed = self.seeds[0]
        self.is_main = jax.process_index() == 0
        self.runtime = train_lib.make_runtime(cfg.mesh.to_dict(), list(cfg.logical_rules) or None,
                                              batches=train_lib.config_batches(cfg))
        self.scoring = cfg.task.scoring
        self.notes: list[str] = []
        self.derived: dict[str, str] = {}  # models made by a stage (generative finetuning): name -> HF directory
        self.digests: dict[str, str] = {}  # input digests: "model:<name>", "tokenizer", "test", ...
        self._configs: dict[str, object] = {}  # checkpoint path -> LlamaConfig
        self._features: dict[str, dict] = {}  # model@layer<k> / model@states<k> -> {"train": pool, "test": ...}
        os.makedirs(workdir, exist_ok=True)
        # Checkpoint paths, with shipped assets ('asset:smollm2') fetched into the asset cache when first needed.
        self.checkpoints = {name: resolve_checkpoint(m.checkpoint) for name, m in cfg.models.items()
                            if m.source == "hf"}

    def path(self, *parts) -> str:
        """A path in the current seed's folder."""
        return os.path.join(self.workdir, *parts)

    def use_seed(self, seed: int) -> None:
        """Make `seed` current: its folder (seed<N>/ when there are several) and its halves of the training data."""
        self.seed = seed
        self.workdir = self.root if self.seeds == [seed] else os.path.join(self.root, f"seed{seed}")
        # Models derived within a seed (generative finetuning) differ between seeds: forget their digests.
        self.derived = {}
        self.digests = {k: v for k, v in self.digests.items() if "+" not in k}
        self._features = {k: v for k, v in self._features.items() if "+" not in k}
        idx_a, idx_b = split_halves(self.train, seed)
        self.idx = {"A": idx_a, "B": idx_b}
        self.half_a, self.half_b = [self.train[i] for i in idx_a], [self.train[i] for i in idx_b]
        self.enc["A"], self.enc["B"] = [self.enc["train"][i] for i in idx_a], [self.enc["train"][i] for i in idx_b]
        if not self.half_a or not self.half_b:
            raise UserError(f"seed {seed}: the training data ({len(self.train)} examples in "
                            f"{len({group_of(e) for e in self.train})} groups) cannot be split in two halves")
        log.info("seed %d: %d / %d train halves, %d test", seed, len(self.half_a), len(self.half_b), len(self.test))

    def _write_json(self, path: str, obj) -> None:
        if self.is_main:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            metrics.atomic_write_text(path, metrics.to_json(obj, indent=1))

    # -------------------------------------------------------------------------------------------- fingerprints
    def open_stage(self, stage_dir: str, spec: dict, outputs: tuple[str, ...] = ()) -> None:
        """Make `stage_dir` hold the stage determined by `spec` (a flat dict): when the stored spec differs, say
        which keys changed and delete the stale outputs (checkpoints, results, predictions) before recomputing."""
        spec = json.loads(metrics.to_json(spec))
        path = os.path.join(stage_dir, "fingerprint.json")
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)["spec"]
            if old == spec:
                return
            log.warning("%s: recomputing, its inputs changed: %s", os.path.relpath(stage_dir, self.root),
                        "; ".join(fingerprint.changes(old, spec)))
            train_lib.barrier(f"checked {stage_dir}")
            if self.is_main:
                for out in (stage_dir, *outputs):
                    if os.path.isdir(out):
                        shutil.rmtree(out)
                    elif os.path.exists(out):
                        os.remove(out)
        train_lib.barrier(f"cleared {stage_dir}")
        self._write_json(path, {"digest": fingerprint.digest(spec), "spec": spec})
        train_lib.barrier(f"opened {stage_dir}")

    def cached(self, run: str, spec: dict, compute, outputs: tuple[str, ...] = ()) -> dict:
        """A stage's result: runs/<run>/result.json when its fingerprint matches `spec`, else `compute()`."""
        run_dir = self.path("runs", run)
        self.open_stage(run_dir, spec, outputs)
        done = os.path.join(run_dir, "result.json")
        if os.path.isfile(done):
            log.info("%s: already done with the same inputs (%s)", run, done)
            with open(done) as f:
                return json.load(f)
        result = compute()
        result["fingerprint"] = fingerprint.digest(json.loads(metrics.to_json(spec)))
        self._write_json(done, result)
        train_lib.barrier(f"done {run}")  # files written by process 0 are read next by all
        return result

    def examples_digest(self, examples: list[dict]) -> str:
        """What a stage reads of its examples: ids, texts, candidates and labels, and how they are tokenized."""
        return fingerprint.digest([self.digests["tokenizer"], self.cfg.task.max_len] +
                                  [[ex["id"], ex["prompt"], ex["candidates"], ex["label"], ex.get("accept")]
                                   for ex in examples])

    def model_digest(self, name: str) -> str:
        """The digest of a model's weights as used: its files, and how many of its layers are kept."""
        key = f"model:{name}"
        if key not in self.digests:
            layers = self.cfg.models[name.split("+")[0]].layers if name in self.cfg.models or "+" in name else 0
            self.digests[key] = fingerprint.digest([convert_digest(self.model_dir(name)), layers])
        return self.digests[key]

    def model_config(self, name: str):
        """The LlamaConfig of a model as used (with `layers` applied)."""
        path = self.model_dir(name)
        if path not in self._configs:  # reading a GGUF's metadata takes seconds
            self._configs[path] = convert.checkpoint_config(path)
        lcfg = self._configs[path]
        return convert.first_layers(lcfg, self.kept_layers(name), f"{path} (models.{name}.layers)")

    def kept_layers(self, name: str) -> int:
        """How many of a model's first decoder layers it keeps (`models.<name>.layers`; 0: all)."""
        return self.cfg.models[name].layers if name in self.cfg.models else 0

    def feature_layer(self, name: str) -> int:
        """The hidden state a linear probe of this model reads."""
        m = self.cfg.models.get(name.split("+")[0])
        return self.cfg.probe.layer if m is None or m.probe_layer is None else m.probe_layer

    def feature_pooling(self, name: str) -> str:
        """Where a linear probe of this model reads that state: 'last' (the prompt's last token) or 'mean'."""
        m = self.cfg.models.get(name.split("+")[0])
        return self.cfg.probe.pooling if m is None or m.get("probe_pooling") is None else m.probe_pooling

    def train_spec(self, model: str, loss_name: str) -> dict:
        """The config keys that determine a finetuning run of `model` with `loss_name`."""
        cfg = self.cfg
        return {**fingerprint.flatten({"train": cfg.train.to_dict(), "eval": cfg.eval.to_dict(),
                                       "model_defaults": cfg.model_defaults.to_dict(),
                                       f"models.{model.split('+')[0]}.lr": cfg.models[model.split("+")[0]].lr,
                                       f"models.{model.split('+')[0]}.epochs": cfg.models[model.split("+")[0]].epochs,
                                       f"losses.{loss_name}": dict(cfg.losses.get(loss_name, {}))}),
                "loss": loss_name, "seed": self.seed, "task.scoring": self.scoring,
                "experiment.labels": cfg.experiment.labels, "model": model,
                "model_weights": self.model_digest(model), "test_examples": self.digests["test"]}

    # -------------------------------------------------------------------------------------------- data
    def prepare_data(self):
        """The task's examples, tokenizer and encodings, shared by every seed (the seeds only split them)."""
        cfg = self.cfg
        data = load_task(cfg.task)
        self.notes.extend(data.get("notes", []))
        # Pretraining text for `source='pretrain'` models: the task's corpus (chess: engine games disjoint from every
        # puzzle), else the unlabelled prompts of the training examples (never test inputs, never labels).
        self.corpus = data.get("corpus") or [ex["prompt"] for ex in data["train"]]
        self.train, self.test = data["train"], data["test"]
        self.tokenizer = self.load_tokenizer()
        self.enc = {}
        kept = {}
        for split, exs in (("train", self.train), ("test", self.test)):
            enc, dropped = batching.encode_examples(exs, self.tokenizer, self.scoring, cfg.task.max_len)
            if dropped:
                self.notes.append(f"{len(dropped)} {split} examples longer than task.max_len={cfg.task.max_len} "
                                  "tokens were dropped")
            kept[split] = [exs[e["src"]] for e in enc]
            for i, item in enumerate(enc):
                item["src"] = i
            self.enc[split] = enc
        self.train, self.test = kept["train"], kept["test"]
        if not self.test:
            raise UserError(f"task {cfg.task.name!r}: no test example is left after dropping those longer than "
                            f"task.max_len={cfg.task.max_len} tokens")
        self.digests["test"] = self.examples_digest(self.test)
        log.info("data: %d training examples (%d groups), %d test", len(self.train),
                 len({group_of(e) for e in self.train}), len(self.test))

    def load_tokenizer(self):
        tcfg = self.cfg.tokenizer
        if tcfg.source == "model":
            path = tcfg.path or next(iter(self.checkpoints.values()))
            self.digests["tokenizer"] = "model:" + convert_digest(path)
            return convert.load_tokenizer(path)
        from transformers import AutoTokenizer
        out = os.path.join(self.root, "tokenizer")
        texts = self.corpus + [c for ex in self.train for c in ex["candidates"]]
        spec = {"tokenizer.vocab_size": tcfg.vocab_size, "tokenizer.split": tcfg.split,
                "texts": fingerprint.digest(texts)}
        self.open_stage(out, spec)
        if not os.path.isfile(os.path.join(out, "tokenizer.json")):
            tokenization.train_tokenizer(texts, tcfg.vocab_size, out if self.is_main else None, split=tcfg.split)
            train_lib.barrier("tokenizer")
        self.digests["tokenizer"] = fingerprint.file_digest(out)
        return AutoTokenizer.from_pretrained(out)

    # -------------------------------------------------------------------------------------------- models
    def model_dir(self, name: str) -> str:
        if name in self.derived:
            return self.derived[name]
        m = self.cfg.models[name]
        return self.checkpoints[name] if m.source == "hf" else os.path.join(self.root, "models", name)

    def ladder(self) -> list[str]:
        """Model names from smallest to largest (ConfigDict keys have no order of their own)."""
        def size(name):
            m = self.cfg.models[name]
            if m.source == "pretrain":
                return presets.get_preset(m.preset).num_non_embedding_params
            return self.model_config(name).num_non_embedding_params
        return sorted(self.cfg.models.keys(), key=size)

    def ensure_model(self, name: str) -> None:
        """Pretrain a ladder model from scratch on the task's corpus (once), saved as a HF checkpoint."""
        m = self.cfg.models[name]
        if m.source == "hf":
            return
        out = self.model_dir(name)
        tok, pcfg = self.tokenizer, self.cfg.pretrain.copy_and_resolve_references()
        pcfg.steps = int(m.get("pretrain_steps", 0) or pcfg.steps)
        spec = {**fingerprint.flatten({"pretrain": pcfg.to_dict(),
                                       "model_defaults": self.cfg.model_defaults.to_dict()}),
                "preset": m.preset, "seed": self.cfg.seed, "tokenizer": self.digests["tokenizer"],
                "corpus": fingerprint.digest(self.corpus), "task.max_len": self.cfg.task.max_len}
        spec.pop("pretrain.microbatches", None)
        self.open_stage(out, spec, outputs=(os.path.join(self.root, "runs", f"pretrain_{name}"),))
        if os.path.isfile(os.path.join(out, "config.json")):
            return
        lcfg = presets.get_preset(m.preset, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  max_position_embeddings=max(pcfg.seq_len, self.cfg.task.max_len),
                                  scan_layers=self.cfg.model_defaults.scan_layers,
                                  remat_policy=self.cfg.model_defaults.remat_policy,
                                  attention=self.cfg.model_defaults.attention)
        rng = jax.random.PRNGKey(self.cfg.seed * 1000 + zlib.crc32(name.encode()) % 1000)
        init = jax.jit(lambda r: nn.meta.unbox(train_lib.LlamaForCausalLM(lcfg).init(r, np.zeros((1, 8), np.int32))),
                       out_shardings={"params": train_lib.lm_param_shardings(lcfg, self.runtime)})
        self.lm_train(os.path.join(self.root, "runs", f"pretrain_{name}"), lcfg, {"lm": init(rng)["params"]},
                      self.corpus, pcfg, out)

    def lm_train(self, run_dir: str, lcfg, params, texts: list[str], lmcfg, out_dir: str) -> None:
        """Next-token training on texts (pretraining, generative finetuning); saves a HF checkpoint to out_dir."""
        tok = self.tokenizer
        ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        blocks = batching.lm_blocks(ids, lmcfg.seq_len, tok.eos_token_id)
        tx = train_lib.make_optimizer(lmcfg, lmcfg.steps, lmcfg.lr)
        abstract, shardings = train_lib.state_shardings(lcfg, None, tx, self.runtime)
        state = train_lib.create_state(params, tx, shardings)
        step = train_lib.jit_step(train_lib.make_lm_step(lcfg, tx, lmcfg.microbatches), shardings, self.runtime)
        order = batching.epoch_order(len(blocks), lmcfg.batch_size, self.cfg.seed, steps=lmcfg.steps)
        with MetricWriter(run_dir, enabled=self.is_main) as writer:
            state, _ = train_lib.run_loop(
                state=state, abstract_state=abstract, shardings=shardings, step_fn=step,
                get_batch=lambda s: {"blocks": blocks[order[s]]}, num_steps=lmcfg.steps,
                ckpt_dir=os.path.join(run_dir, "ckpt"), runtime=self.runtime,
                checkpoint_every=self.cfg.train.checkpoint_every, writer=writer, desc=os.path.basename(run_dir))
        convert.save_hf(lcfg, state.params["lm"], out_dir)  # every process calls it; process 0 writes
        if self.is_main:
            tok.save_pretrained(out_dir)
        train_lib.barrier(f"saved {out_dir}")

    def load_model(self, name: str):
        """(LlamaConfig, params) of a model as used: only its first `layers` decoder layers are read (an early
        exit), the others never leave the file."""
        md = self.cfg.model_defaults
        lcfg, params = convert.load_checkpoint(self.model_dir(name), dtype=md.dtype, param_dtype=md.param_dtype,
                                               scan_layers=md.scan_layers, mesh=self.runtime.mesh,
                                               rules=self.runtime.rules, layers=self.kept_layers(name))
        return lcfg.replace(attention=md.attention), params

    # -------------------------------------------------------------------------------------------- runs
    def train_and_predict(self, run: str, model: str, train_split: str, train_idx: list[int],
                          targets: list[np.ndarray], loss_name: str, label_sets: dict[str, str],
                          val: tuple[list[int], list[np.ndarray]] | None = None, val_kind: str = "weak_labels",
                          features_for: tuple[str, ...] = ()) -> dict:
        """Train `model` on examples `train_idx` of `train_split` with `targets`, then predict the test set and
        every split in `label_sets` ({label_name: split}). With early stopping on, `val` (examples and the targets
        that score them, described by `val_kind`) picks the best step. Reused when its fingerprint matches."""
        split_examples = {"A": self.half_a, "B": self.half_b, "test": self.test}
        early = val is not None and self.cfg.train.early_stopping != "none"
        spec = {**self.train_spec(model, loss_name),
                "train_examples": self.examples_digest([split_examples[train_split][i] for i in train_idx]),
                "targets": fingerprint.digest([np.round(t, 7).tolist() for t in targets]),
                "val": fingerprint.digest([val[0], [np.round(t, 7).tolist() for t in val[1]]]) if early else None,
                "val_kind": val_kind if early else None,
                "label_sets": {k: self.examples_digest(split_examples[s]) for k, s in sorted(label_sets.items())},
                "features_for": {s: self.examples_digest(split_examples[s]) for s in features_for},
                "probe_layer": self.feature_layer(model) if features_for or self.probing else None,
                "probe_pooling": self.feature_pooling(model) if features_for or self.probing else None}
        if self.probing or self.cfg.train.head_init == "probe":  # the probe settings fit the probe (or the head)
            spec.update({f"probe.{k}": v for k, v in self.cfg.probe.to_dict().items() if k not in ("layer", "pooling")})
        if self.probing:
            compute = lambda: self._probe_and_predict(run, model, train_split, train_idx, targets, label_sets,
                                                      val if early else None, val_kind)
        else:
            compute = lambda: self._train_and_predict(run, model, train_split, train_idx, targets, loss_name,
                                                      label_sets, val if early else None, val_kind, features_for)
        return self.cached(run, spec, compute, outputs=(self.path("predictions", f"{run}.jsonl"),))

    @property
    def probing(self) -> bool:
        return self.cfg.train.method == "probe"

    def features(self, model: str, split: str, layer: int | None = None, pooling: str | None = None) -> np.ndarray:
        """Frozen features of `model` at its probe layer and pooling (or `layer`, `pooling`) for the examples of a
        split ('A', 'B', 'test'), computed once for the whole training pool (cached on disk, and in memory for the
        run), so every seed's halves are rows of the same array."""
        from w2s_jax import elicitation
        layer = self.feature_layer(model) if layer is None else layer
        pooling = self.feature_pooling(model) if pooling is None else pooling
        key = f"{model}@layer{layer}/{pooling}"  # the probes and a probe head on the same features share one copy
        if key not in self._features:  # read (or computed) once a run, not once a probe
            self._features[key] = elicitation.model_features(self, model, layer, pooling=pooling)
        feats = self._features[key]
        return feats["test"] if split == "test" else feats["train"][self.idx[split]]

    def top_layer_inputs(self, model: str, k: int) -> dict[str, list[dict]]:
        """The encodings of the splits ('A', 'B', 'test') carrying the hidden states that `model`'s top k layers
        read: computed once for the training pool and the test set (cached on disk, like probe features)."""
        from w2s_jax import elicitation, probe
        key = f"{model}@states{k}"
        if key not in self._features:
            layer = self.model_config(model).num_hidden_layers - k
            states = elicitation.model_features(self, model, layer, prompt_states=True)
            self._features[key] = {s: probe.split_states(states[s], self.enc[s]) for s in ("train", "test")}
        states = self._features[key]
        out = {"test": top_layers.with_states(self.enc["test"], states["test"])}
        for split in ("A", "B"):
            out[split] = top_layers.with_states(self.enc[split], [states["train"][i] for i in self.idx[split]])
        return out

    def _probe_and_predict(self, run, model, train_split, train_idx, targets, label_sets, val, val_kind) -> dict:
        """`train.method='probe'`: a logistic-regression probe on the model's frozen features instead of
        finetuning; early-stopped on `val` when given."""
        from w2s_jax import probe
        log.info("%s: probing %s on %d examples of half %s", run, model, len(train_idx), train_split)
        feats = self.features(model, train_split)
        p = self.cfg.probe
        val_data = None if val is None else (feats[val[0]], stack_targets(val[1]))
        params = probe.train_logreg(feats[train_idx], stack_targets(targets), l2=p.l2, lr=p.lr, epochs=p.epochs,
                                    batch_size=min(p.batch_size, len(train_idx)), seed=self.seed, val=val_data,
                                    patience=p.patience)
        result = {"run": run, "model": model, "seed": self.seed, "method": "probe", "loss": "xent",
                  "train_examples": len(train_idx), "early_stopping": val_kind if val else "none", "labels": {},
                  "probe_layer": self.feature_layer(model), "probe_pooling": self.feature_pooling(model)}
        result.update(self.score_test(run, [int(x) for x in probe.probe_predict(params, self.features(model, "test"))]))
        for label_name, split in label_sets.items():
            logits = probe.probe_logits(params, self.features(model, split))
            exs = {"A": self.half_a, "B": self.half_b, "test": self.test}[split]
            result["labels"][label_name] = self.write_labels(run, label_name, exs, logits)
        return result

    def probe_head_kernel(self, model: str, train_split: str, train_idx: list[int], targets) -> np.ndarray:
        """`train.head_init='probe'`: the head's starting kernel, a probe (`probe.fit_head_kernel`, the `probe`
        settings) on what the head reads, the frozen model's final normed state at the last prompt token, fitted on
        the run's own training examples and targets."""
        from w2s_jax import probe
        feats = self.features(model, train_split, layer=-1, pooling="last")[train_idx]
        p = self.cfg.probe
        log.info("fitting %s's head as a probe on its final features (train.head_init='probe')", model)
        return probe.fit_head_kernel(feats, stack_targets(targets), l2=p.l2, lr=p.lr, epochs=p.epochs,
                                     batch_size=min(p.batch_size, len(train_idx)), seed=self.seed)

    def write_labels(self, run: str, label_name: str, examples: list[dict], logits) -> str:
        """Soft labels (the softmax over each example's candidates) with the example ids, as runs/<run>/labels_*."""
        path = self.path("runs", run, f"labels_{label_name}.jsonl")
        if self.is_main:
            probs = [softmax_valid(np.asarray(l), len(ex["candidates"])) for l, ex in zip(logits, examples)]
            metrics.atomic_write_text(path, "".join(
                json.dumps({"id": ex["id"], "probs": [round(float(x), 7) for x in p]}) + "\n"
                for ex, p in zip(examples, probs)))
        return path

    def _train_and_predict(self, run, model, train_split, train_idx, targets, loss_name, label_sets, val, val_kind,
                           features_for) -> dict:
        log.info("%s: training %s on %d examples of half %s with %s", run, model, len(train_idx), train_split,
                 loss_name)
        run_dir = self.path("runs", run)
        cfg, tcfg = self.cfg, self.cfg.train
        lcfg, lm_params = self.load_model(model)
        lcfg = lcfg.replace(remat_policy=cfg.model_defaults.remat_policy)
        label_ids, probe_kernel = None, None
        if tcfg.head_init == "unembed":
            label_ids = [self.tokenizer(w, add_special_tokens=False)["input_ids"][-1]
                         for w in self.test[0]["candidates"]]
        elif tcfg.head_init == "probe":
            probe_kernel = self.probe_head_kernel(model, train_split, train_idx, targets)
        head = heads.init_head(self.scoring, len(self.test[0]["candidates"]), lm_params, lcfg, tcfg.head_init,
                               label_ids, probe_kernel)
        encs, lm_keys = self.enc, None
        if 0 < tcfg.trainable_layers < lcfg.num_hidden_layers:  # the top layers alone, on their inputs' states
            encs = self.top_layer_inputs(model, tcfg.trainable_layers)
            lcfg, lm_params = top_layers.keep_top_layers(lcfg, lm_params, tcfg.trainable_layers)
            lm_keys = set(lm_params)
        params = {"lm": lm_params} if head is None else {"lm": lm_params, "head": head}
        enc = [encs[train_split][i] for i in train_idx]
        epochs = float(cfg.models[model.split("+")[0]].epochs or tcfg.epochs)
        order = batching.epoch_order(len(enc), tcfg.batch_size, self.seed, epochs=epochs,
                                     lengths=[e["length"] for e in enc], group=tcfg.group_by_length)
        steps = len(order)
        lr = float(cfg.models[model.split("+")[0]].lr or tcfg.lr)
        tx = train_lib.make_optimizer(tcfg, steps, lr)
        abstract, shardings = train_lib.state_shardings(lcfg, head, tx, self.runtime, lm_keys)
        state = train_lib.create_state(params, tx, shardings)
        loss = losses_lib.get(loss_name, **dict(cfg.losses.get(loss_name, {})))
        step = train_lib.jit_step(train_lib.make_choice_step(lcfg, self.scoring, loss, tx, steps, tcfg.microbatches),
                                  shardings, self.runtime)
        b, (k, _, t) = self.cfg.train.batch_size, batching.max_shapes(enc, self.scoring)

        def get_batch(s):
            rows = order[s]
            items = [enc[i] for i in rows]
            tgt = np.zeros((len(rows), k), np.float32)
            for r, i in enumerate(rows):
                tgt[r, :len(targets[i])] = targets[i]
            return batching.collate(items, self.scoring, tgt, b, k, batching.seq_bucket(items, tcfg.length_multiple), t)

        predict = train_lib.make_predict_fn(lcfg, self.scoring, self.runtime, shardings.params)
        eval_fn = None
        if val is not None:
            v_idx, v_targets = val
            v_enc = [encs[train_split][i] for i in v_idx]
            v_labels = [int(np.argmax(t)) for t in v_targets]
            eval_fn = lambda st: metrics.accuracy([int(np.argmax(l)) for l in self._logits(predict, st.params, v_enc)],
                                                  [[l] for l in v_labels])
        with MetricWriter(run_dir, enabled=self.is_main) as writer:
            state, loop = train_lib.run_loop(
                state=state, abstract_state=abstract, shardings=shardings, step_fn=step, get_batch=get_batch,
                num_steps=steps, ckpt_dir=os.path.join(run_dir, "ckpt"), runtime=self.runtime,
                checkpoint_every=tcfg.checkpoint_every, eval_fn=eval_fn, eval_every=tcfg.eval_every,
                writer=writer, desc=run)
        result = {"run": run, "model": model, "seed": self.seed, "steps": steps, "lr": lr, "epochs": epochs,
                  "loss": loss_name,
                  "train_examples": len(train_idx), "early_stopping": val_kind if eval_fn else "none",
                  "best_step": loop["best_step"], "labels": {}}
        preds, texts = self.test_predictions(lcfg, predict, state, shardings, encs["test"])
        result.update(self.score_test(run, preds, texts))
        for label_name, split in label_sets.items():
            logits = self._logits(predict, state.params, encs[split])
            exs = {"A": self.half_a, "B": self.half_b, "test": self.test}[split]
            result["labels"][label_name] = self.write_labels(run, label_name, exs, logits)
        if features_for:  # for "finetune, then probe": the finetuned trunk's features
            from w2s_jax import probe
            result["features"] = {}
            for split in features_for:
                path = os.path.join(run_dir, f"features_{split}.npy")
                feats = probe.extract_features(lcfg, state.params["lm"], self.enc[split], self.feature_layer(model),
                                               self.runtime, self.cfg.eval.batch_size, self.feature_pooling(model))
                if self.is_main:
                    np.save(path, feats)
                result["features"][split] = path
        return result

    def score_test(self, run: str, preds: list[int], texts: list[str] | None = None) -> dict:
        """Accuracy and answers of test predictions; writes predictions/<run>.jsonl, one line per test example
        with the predicted and the correct candidate's text, from which every reported number recomputes."""
        answers = answer_keys(self.test, preds, texts)
        rows = []
        for i, (ex, p) in enumerate(zip(self.test, preds)):
            accept = ex.get("accept", [ex["label"]])
            row = {"id": ex["id"], "group": group_of(ex), "label": ex["label"], "prediction": p, "accept": accept,
                   "correct": p in accept, "answer": ex["candidates"][ex["label"]],
                   "predicted": ex["candidates"][p] if p >= 0 else None, "key": answers[i]}
            if texts is not None:
                row["generated"] = texts[i]
            rows.append(row)
        if self.is_main:
            metrics.write_predictions(self.path("predictions", f"{run}.jsonl"), rows)
        return {"accuracy": metrics.accuracy(preds, accepts(self.test)), "test_predictions": preds,
                "test_answers": answers,
                "eval_mode": self.cfg.eval.mode if self.scoring == "choice_lm" else "argmax"}

    def test_predictions(self, lcfg, predict, state, shardings, enc_test):
        """Predicted candidate index per test example (encoded as `enc_test`): the best-scoring candidate, or for
        `eval.mode='greedy'` the greedily generated continuation (-1, i.e. wrong, when it is not a legal candidate).
        Returns (preds, texts)."""
        if self.scoring == "choice_lm" and self.cfg.eval.mode == "greedy":
            from w2s_jax import generate
            fn = generate.make_greedy_fn(lcfg, self.runtime, shardings.params["lm"], self.cfg.eval.max_new_tokens)
            return generate.greedy_predictions(
                lambda p, i, m: fn(p["lm"], i, m), state.params, self.tokenizer,
                [e["prompt"] for e in enc_test], [ex["candidates"] for ex in self.test],
                self.cfg.eval.batch_size)
        logits = self._logits(predict, state.params, enc_test)
        return [int(np.argmax(l)) for l in logits], None

    def _logits(self, predict, params, enc, scoring=None) -> list[np.ndarray]:
        """Candidate logits for every encoded example (length-bucketed batches), in the original order."""
        out = [None] * len(enc)
        bs, scoring = self.cfg.eval.batch_size, scoring or self.scoring
        k, _, t = batching.max_shapes(enc, scoring)
        for idx, items in batching.prediction_batches(enc, bs):
            l = batching.seq_bucket(items, self.cfg.train.length_multiple)
            batch = batching.collate(items, scoring, None, bs, k, l, t)
            logits = predict(params, batch)
            for r, i in enumerate(idx):
                out[i] = logits[r, :len(items[r]["cands"])]
        return out

    def read_labels(self, path: str, examples: list[dict]) -> list[np.ndarray]:
        by_id = {row["id"]: np.asarray(row["probs"], np.float32)
                 for row in metrics.read_jsonl(path, required=("id", "probs"))}
        out = []
        for ex in examples:
            p = by_id[ex["id"]]
            if self.cfg.experiment.labels == "hard":
                p = np.eye(len(p), dtype=np.float32)[int(np.argmax(p))]
            out.append(p)
        return out

    # -------------------------------------------------------------------------------------------- the plan
    def validation_split(self, idx: list[int], examples: list[dict]) -> tuple[list[int], list[int]]:
        """Carve the validation examples for early stopping out of a training split, whole groups only (none when
        early stopping is off). Returns (train, validation)."""
        frac = self.cfg.train.val_frac if self.cfg.train.early_stopping != "none" else 0.0
        if not frac:
            return idx, []
        val, train = cut_at_groups(idx, [group_of(ex) for ex in examples], [frac])
        return train, val

    def run(self) -> dict:
        """Every seed's stages, then the means over seeds with intervals; writes the report."""
        cfg, exp = self.cfg, self.cfg.experiment
        started = provenance(cfg)  # the code as the run starts: later edits of the checkout are not what ran
        self.prepare_data()
        pairs = [tuple(p) for p in parse_chains(exp.pairs)]
        chains = parse_chains(exp.chains)
        gt_models = parse_list(exp.ground_truth) or self.ladder()
        for m in {m for p in pairs for m in p} | {m for c in chains for m in c}:
            if m not in gt_models:
                gt_models.append(m)
        order = [m for m in self.ladder() if m in gt_models]
        for m in order:
            self.ensure_model(m)
        self.models = {}
        for m in order:
            lcfg = self.model_config(m)
            self.models[m] = {"params": lcfg.num_params, "non_embedding_params": lcfg.num_non_embedding_params}
        self.supervisors = {p[0] for p in pairs} | {c[0] for c in chains}
        if self.probing or "probe" in parse_list(exp.methods):
            where = {"last": "the prompt's last token", "mean": "the mean over the prompt's tokens"}
            state = lambda k: "the final normed state" if k == -1 else f"hidden state {k}"
            self.notes.append("probe features: " + "; ".join(
                f"{m}: {state(self.feature_layer(m))}, {where[self.feature_pooling(m)]}" for m in order))
        per_seed = {}
        for seed in self.seeds:
            self.use_seed(seed)
            per_seed[seed] = self.run_seed(order, pairs, chains)
        self.results = summarize(per_seed, self.test, self.models, cfg.task.name, self.notes)
        self.results.update(started)
        if self.is_main:
            report.write_report(self.results, self.root)
        return self.results

    def run_seed(self, order, pairs, chains) -> dict:
        """One seed: ground truth, students, methods and chains. Returns {"runs": rows, "outputs": {run: answers}}."""
        exp = self.cfg.experiment
        losses, methods = parse_list(exp.losses), parse_list(exp.methods)
        self.rows, self.outputs = [], {}
        # Ground truth on half A (the weak floor, the ceilings and the supervisors); supervisors also label half B.
        self.gt = {}
        for m in order:
            self.ground_truth(m)

        # Chain steps train on slices of half B, labelled by the previous model (fresh data per step, as the
        # paper); with pair_examples='chain_step' a direct pair trains on the slice of a chain's last step.
        n_steps = max((len(c) - 1 for c in chains), default=1)
        b_groups = [group_of(ex) for ex in self.half_b]
        slices = cut_at_groups(list(range(len(self.half_b))), b_groups, [k / n_steps for k in range(1, n_steps)])
        pair_idx = slices[-1] if exp.pair_examples == "chain_step" else list(range(len(self.half_b)))
        for sup, stu in pairs:
            weak_labels = self.read_labels(self.gt[sup]["labels"]["B"], self.half_b)
            runs = {}
            for loss in losses:
                name = f"w2s_{sup}_to_{stu}_{loss}"
                feats = ("A", "test") if loss == "xent" and "finetune_probe" in methods else ()
                runs[loss] = self._student(name, stu, pair_idx, weak_labels, loss, {}, features_for=feats)
                self.add_student(name, runs[loss], stu, sup, loss, sup, self.gt[sup])
            self.run_methods(methods, sup, stu, weak_labels, pair_idx, runs.get("xent"))
            if "random_flips" in parse_list(exp.controls):
                name = f"control_{sup}_to_{stu}_random_flips"
                flips = self.random_flip_labels(weak_labels, name)
                res = self._student(name, stu, pair_idx, flips, "xent", {})
                self.add_student(name, res, stu, sup, "control:random_flips", sup, self.gt[sup])

        for chain in chains:
            parts = cut_at_groups(list(range(len(self.half_b))), b_groups,
                                  [k / (len(chain) - 1) for k in range(1, len(chain) - 1)])
            prev_run, method = self.gt[chain[0]], "chain:" + "->".join(chain)
            for j, (sup, stu) in enumerate(zip(chain[:-1], chain[1:])):
                labels = self.read_labels(prev_run["labels"]["B"], self.half_b)
                name = f"chain_{'-'.join(chain)}_{exp.chain_loss}_step{j + 1}"
                final = j == len(chain) - 2
                res = self._student(name, stu, parts[j], labels, exp.chain_loss, {} if final else {"B": "B"})
                row = self.add_student(name, res, stu, chain[0], method if final else f"{method} step {j + 1}",
                                       sup, prev_run)
                row.update(loss=exp.chain_loss, chain_step=j + 1, chain_final=final)
                prev_run = res
        return {"runs": self.rows, "outputs": self.outputs}

    def random_flip_labels(self, weak_labels: list[np.ndarray], name: str) -> list[np.ndarray]:
        """Ground truth of half B with as many labels flipped, at random, as the supervisor gets wrong there: a
        student of these labels learns from noise of the same amount but without the supervisor's structure."""
        wrong = sum(int(np.argmax(w)) not in ex.get("accept", [ex["label"]]) for w, ex in zip(weak_labels, self.half_b))
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        flipped = set(rng.choice(len(self.half_b), size=wrong, replace=False).tolist())
        out = []
        for i, ex in enumerate(self.half_b):
            label = ex["label"]
            if i in flipped:
                label = int(rng.choice([c for c in range(len(ex["candidates"])) if c != ex["label"]]))
            out.append(np.eye(len(ex["candidates"]), dtype=np.float32)[label])
        return out

    def add_row(self, res: dict, row: dict) -> dict:
        """Record a result row of this seed, with the run's test answers for the statistics over seeds."""
        row = {"name": res["run"], "seed": self.seed, "accuracy": res["accuracy"],
               "early_stopping": res.get("early_stopping", "none"), "supervisor": None, **row}
        self.outputs[res["run"]] = {"correct": metrics.correct(res["test_predictions"], accepts(self.test)),
                                    "answers": res.get("test_answers") or answer_keys(
                                        self.test, res["test_predictions"], None)}
        self.rows.append(row)
        return row

    def ground_truth(self, m: str) -> None:
        """Train model m on half A's ground truth; a supervisor also labels half B."""
        tr_a, val_a = self.validation_split(list(range(len(self.half_a))), self.half_a)
        self.gt[m] = self.train_and_predict(
            f"gt_{m}", m, "A", tr_a, one_hot_targets([self.half_a[i] for i in tr_a]), "xent",
            {"B": "B"} if m in self.supervisors else {},
            val=(val_a, one_hot_targets([self.half_a[i] for i in val_a])), val_kind="ground_truth")
        self.add_row(self.gt[m], {"role": "weak" if m in self.supervisors else "ceiling", "model": m,
                                  "method": GT})

    def run_methods(self, methods, sup, stu, weak_labels, idx, xent_run) -> None:
        """The elicitation methods beyond finetuning for one (supervisor, student) pair (elicitation.py)."""
        from w2s_jax import elicitation as E
        if "probe" in methods:
            ceiling = E.ground_truth_probe(self, stu)
            self.add_row(ceiling, {"role": "ceiling", "model": stu, "method": "probe"})
            res = E.weak_probe(self, sup, stu, [weak_labels[i] for i in idx], idx)
            self.add_student(res["run"], res, stu, sup, "probe", sup, self.gt[sup], ceiling_run=ceiling["run"])
        if "finetune_probe" in methods:
            res = E.finetune_then_probe(self, stu, xent_run)
            self.add_row(res, {"role": "baseline", "model": stu, "method": "finetune_probe"})
        if "genft" in methods:
            derived = E.generative_finetune(self, stu)
            self.models.setdefault(derived, self.models[stu])
            self.ground_truth(derived)
            name = f"w2s_{sup}_to_{derived}_xent"
            res = self._student(name, derived, idx, weak_labels, "xent", {})
            self.add_student(name, res, derived, sup, "genft+xent", sup, self.gt[sup])
        if "zero_shot" in methods:
            res = E.zero_shot(self, stu)
            self.add_row(res, {"role": "baseline", "model": stu, "method": "zero_shot"})
        if "few_shot" in methods:
            res = E.few_shot(self, sup, stu, weak_labels)
            self.add_student(res["run"], res, stu, sup, "few_shot", sup, self.gt[sup])

    def _student(self, name, model, idx, labels, loss, label_sets, features_for=()):
        tr, val = self.validation_split(idx, self.half_b)
        oracle = self.cfg.train.early_stopping == "ground_truth_oracle"
        val_targets = (one_hot_targets([self.half_b[i] for i in val]) if oracle else [labels[i] for i in val])
        return self.train_and_predict(name, model, "B", tr, [labels[i] for i in tr], loss, label_sets,
                                      val=(val, val_targets), features_for=features_for,
                                      val_kind="ground_truth_oracle" if oracle else "weak_labels")

    def add_student(self, name, res, student, weak, method, direct_sup, sup_run, ceiling_run=None) -> dict:
        """A student's row: accuracy, PGR between the weak model and the ceiling (the student trained on ground
        truth, or `ceiling_run` for methods with their own), and (error) agreement with its direct supervisor."""
        acc_weak = self.gt[weak]["accuracy"]
        ceiling = self.gt[student] if ceiling_run is None else self.find_run(ceiling_run)
        sup_answers = sup_run.get("test_answers") or answer_keys(self.test, sup_run["test_predictions"], None)
        stu_answers = res.get("test_answers") or answer_keys(self.test, res["test_predictions"], None)
        row = self.add_row(res, {
            "role": "student", "model": student, "supervisor": weak, "direct_supervisor": direct_sup,
            "supervisor_run": sup_run["run"], "weak_run": self.gt[weak]["run"], "ceiling_run": ceiling["run"],
            "method": method, "pgr": metrics.pgr(res["accuracy"], acc_weak, ceiling["accuracy"]),
            "agreement": metrics.agreement(stu_answers, sup_answers),
            "ceiling_agreement": metrics.agreement(self.outputs[ceiling["run"]]["answers"], sup_answers),
            "error_agreement": metrics.error_agreement(
                stu_answers, sup_answers, metrics.correct(sup_run["test_predictions"], accepts(self.test)))})
        return row

    def find_run(self, name: str) -> dict:
        row = next(r for r in self.rows if r["name"] == name)
        return {"run": name, "accuracy": row["accuracy"]}


# ------------------------------------------------------------------------------------------------ over seeds
def summarize(per_seed: dict, test: list[dict], models: dict, task: str, notes: list[str]) -> dict:
    """The results dict: one row per run with its mean over seeds, 95% interval and every seed's value (stats.py),
    and the seeds' own rows under "per_seed"."""
    seeds = list(per_seed)
    sampler = stats.Resampler(seeds, [group_of(ex) for ex in test])
    first = per_seed[seeds[0]]["runs"]

    def outputs(run, key):
        return {s: np.asarray(per_seed[s]["outputs"][run][key]) for s in seeds}

    def mean(run):
        return sampler.mean(outputs(run, "correct"))

    def values(name, key):
        return [next(r for r in per_seed[s]["runs"] if r["name"] == name).get(key) for s in seeds]

    def with_interval(row, key, estimate):
        row[key], row[f"{key}_ci"] = estimate[0], stats.interval(estimate[1])
        row[f"{key}_seeds"] = values(row["name"], key)

    rows = []
    for seed_row in first:
        row = {k: v for k, v in seed_row.items() if k not in ("seed", "accuracy", "pgr", "agreement",
                                                                "error_agreement", "ceiling_agreement")}
        with_interval(row, "accuracy", mean(row["name"]))
        if row["role"] == "student":
            row.update(stats.pgr(mean(row["name"]), mean(row["weak_run"]), mean(row["ceiling_run"])))
            row["pgr_seeds"] = values(row["name"], "pgr")
            stu, sup = outputs(row["name"], "answers"), outputs(row["supervisor_run"], "answers")
            agree = {s: stu[s] == sup[s] for s in seeds}
            with_interval(row, "agreement", sampler.mean(agree))
            ceiling = outputs(row["ceiling_run"], "answers")
            with_interval(row, "ceiling_agreement", sampler.mean({s: ceiling[s] == sup[s] for s in seeds}))
            sup_wrong = {s: ~outputs(row["supervisor_run"], "correct")[s] for s in seeds}
            if any(w.any() for w in sup_wrong.values()):
                with_interval(row, "error_agreement", sampler.mean(agree, where=sup_wrong))
            else:
                row["error_agreement"], row["error_agreement_ci"] = None, None
        rows.append(row)
    return {"task": task, "models": models, "seeds": seeds, "n_test": len(test),
            "test_clusters": sampler.n_clusters, "interval": "95% two-level bootstrap over seeds and test "
            f"clusters ({stats.N_BOOT} replicates; w2s_jax/stats.py)", "runs": rows,
            "per_seed": {str(s): per_seed[s]["runs"] for s in seeds}, "notes": notes}


def provenance(cfg) -> dict:
    """What a reader needs to rerun the numbers: the resolved config, the command, the commit, package versions."""
    from importlib import metadata
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers", "tokenizers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["python"] = sys.version.split()[0]
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"config": json.loads(metrics.to_json(cfg.to_dict())), "command": " ".join(["python"] + sys.argv),
            "commit": (commit + ("+uncommitted changes" if dirty else "")) or None, "versions": versions,
            "devices": {"count": jax.device_count(), "platform": jax.default_backend(),
                        "processes": jax.process_count()}}


def convert_digest(path: str) -> str:
    """The digest of a model's files (an HF directory or a GGUF file)."""
    return fingerprint.file_digest(path)
