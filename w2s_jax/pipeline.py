"""The weak-to-strong experiment: stages from one config, each writing into the workdir and skipped when done.

Stages: task data -> tokenizer -> models (pretrained here or loaded from HF checkpoints) -> ground-truth runs
(every model on half A: the weak floor, the strong ceiling and the supervisors, as the reference `sweep.py`) ->
students on half B for every (supervisor, student, loss) -> bootstrapping chains -> results.json, predictions,
results.md and plots. Splits depend only on the seed; labels are stored as soft probabilities with example ids.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from w2s_jax import losses as losses_lib
from w2s_jax import metrics, report
from w2s_jax import train as train_lib
from w2s_jax.data import batching
from w2s_jax.metric_writer import MetricWriter
from w2s_jax.models import convert, heads, presets

log = logging.getLogger(__name__)

GT = "ground_truth"


# ------------------------------------------------------------------------------------------------ config helpers
def parse_chains(spec: str) -> list[list[str]]:
    """'weak->mid->strong' (comma-separated for several) -> [['weak', 'mid', 'strong']]."""
    return [[m.strip() for m in c.split("->")] for c in spec.split(",") if c.strip()]


def parse_list(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


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
        if m.source == "hf":
            if not m.checkpoint:
                problems.append(f"models.{name}.checkpoint is empty: give the path of a Hugging Face LLaMA "
                                f"directory (--config.models.{name}.checkpoint=/path/to/llama)")
            elif not os.path.isfile(os.path.join(m.checkpoint, "config.json")):
                problems.append(f"models.{name}.checkpoint={m.checkpoint!r}: no config.json there")
        elif m.source == "pretrain":
            if m.preset not in presets.PRESETS:
                problems.append(f"models.{name}.preset={m.preset!r}: valid presets are {list(presets.PRESETS)}")
        else:
            problems.append(f"models.{name}.source={m.source!r}: expected 'pretrain' or 'hf'")
    from w2s_jax.elicitation import METHODS
    for method in parse_list(exp.methods):
        if method not in METHODS:
            problems.append(f"experiment.methods: unknown method {method!r}; valid methods are {list(METHODS)}")
    if cfg.eval.mode not in ("rank", "greedy"):
        problems.append(f"eval.mode={cfg.eval.mode!r}: expected 'rank' or 'greedy'")
    if exp.labels not in ("soft", "hard"):
        problems.append(f"experiment.labels={exp.labels!r}: expected 'soft' or 'hard'")
    if cfg.train.early_stopping not in ("none", "weak_labels", "ground_truth_oracle"):
        problems.append(f"train.early_stopping={cfg.train.early_stopping!r}: expected 'none', 'weak_labels' or "
                        "'ground_truth_oracle'")
    if cfg.train.batch_size % max(1, cfg.train.microbatches):
        problems.append(f"train.batch_size={cfg.train.batch_size} is not a multiple of "
                        f"train.microbatches={cfg.train.microbatches}")
    if cfg.tokenizer.source == "train" and any(m.source == "hf" for m in cfg.models.values()):
        problems.append("tokenizer.source='train' cannot serve HF checkpoints; use tokenizer.source='model'")
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
    raise ValueError(f"task.loader={task_cfg.loader!r}: expected 'chess', 'nlp' or 'reward'")


def split_halves(examples: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic 50/50 split: half A trains the ground-truth models, half B is labelled for the students."""
    order = np.random.default_rng(seed).permutation(len(examples))
    half = len(examples) // 2
    return [examples[i] for i in order[:half]], [examples[i] for i in order[half:]]


def one_hot_targets(examples: list[dict]) -> list[np.ndarray]:
    out = []
    for ex in examples:
        t = np.zeros(len(ex["candidates"]), np.float32)
        t[ex["label"]] = 1.0
        out.append(t)
    return out


def accepts(examples: list[dict]) -> list[list[int]]:
    return [ex.get("accept", [ex["label"]]) for ex in examples]


def softmax_valid(logits: np.ndarray, k: int) -> np.ndarray:
    z = logits[:k] - logits[:k].max()
    p = np.exp(z)
    return p / p.sum()


# ------------------------------------------------------------------------------------------------ the experiment
class Experiment:
    def __init__(self, cfg, workdir: str):
        validate_config(cfg)
        self.cfg = cfg
        self.workdir = workdir
        self.is_main = jax.process_index() == 0
        self.runtime = train_lib.make_runtime(cfg.mesh.to_dict(), list(cfg.logical_rules) or None)
        self.scoring = cfg.task.scoring
        self.notes: list[str] = []
        self.derived: dict[str, str] = {}  # models made by a stage (generative finetuning): name -> HF directory
        os.makedirs(workdir, exist_ok=True)

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def _write_json(self, path: str, obj) -> None:
        if self.is_main:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            metrics.atomic_write_text(path, metrics.to_json(obj, indent=1))

    # -------------------------------------------------------------------------------------------- data
    def prepare_data(self):
        cfg = self.cfg
        data = load_task(cfg.task)
        self.test = data["test"]
        self.half_a, self.half_b = split_halves(data["train"], cfg.seed)
        # Pretraining text for `source='pretrain'` models: the task's corpus (chess: engine games disjoint from every
        # puzzle), else the unlabelled prompts of the training examples (never test inputs, never labels).
        self.corpus = data.get("corpus") or [ex["prompt"] for ex in data["train"]]
        self.tokenizer = self.load_tokenizer()
        encode = lambda exs: batching.encode_examples(exs, self.tokenizer, self.scoring, cfg.task.max_len)
        self.enc = {}
        for split, exs in (("A", self.half_a), ("B", self.half_b), ("test", self.test)):
            enc, dropped = encode(exs)
            if dropped:
                self.notes.append(f"{len(dropped)} {split} examples longer than task.max_len={cfg.task.max_len} "
                                  "tokens were dropped")
            self.enc[split] = enc
        keep = lambda exs, enc: [exs[e["src"]] for e in enc]
        self.half_a, self.half_b, self.test = (keep(self.half_a, self.enc["A"]), keep(self.half_b, self.enc["B"]),
                                               keep(self.test, self.enc["test"]))
        for split, e in self.enc.items():
            for i, item in enumerate(e):
                item["src"] = i
        log.info("data: %d / %d train halves, %d test", len(self.half_a), len(self.half_b), len(self.test))

    def load_tokenizer(self):
        tcfg = self.cfg.tokenizer
        from transformers import AutoTokenizer
        if tcfg.source == "model":
            first = next(m for m in self.cfg.models.values() if m.source == "hf")
            return AutoTokenizer.from_pretrained(tcfg.path or first.checkpoint)
        out = self.path("tokenizer")
        if os.path.isfile(os.path.join(out, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(out)
        from w2s_jax.data import tokenization
        texts = self.corpus + [c for ex in self.half_a + self.half_b for c in ex["candidates"]]
        tok = tokenization.train_tokenizer(texts, tcfg.vocab_size, out if self.is_main else None)
        return tok

    # -------------------------------------------------------------------------------------------- models
    def model_dir(self, name: str) -> str:
        if name in self.derived:
            return self.derived[name]
        m = self.cfg.models[name]
        return m.checkpoint if m.source == "hf" else self.path("models", name)

    def ladder(self) -> list[str]:
        """Model names from smallest to largest (ConfigDict keys have no order of their own)."""
        def size(name):
            m = self.cfg.models[name]
            if m.source == "pretrain":
                return presets.get_preset(m.preset).num_non_embedding_params
            with open(os.path.join(m.checkpoint, "config.json")) as f:
                return convert.config_from_hf(json.load(f)).num_non_embedding_params
        return sorted(self.cfg.models.keys(), key=size)

    def ensure_model(self, name: str) -> None:
        """Pretrain a ladder model from scratch on the task's corpus (once), saved as a HF checkpoint."""
        m = self.cfg.models[name]
        out = self.model_dir(name)
        if m.source == "hf" or os.path.isfile(os.path.join(out, "config.json")):
            return
        tok, pcfg = self.tokenizer, self.cfg.pretrain
        lcfg = presets.get_preset(m.preset, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  max_position_embeddings=max(pcfg.seq_len, self.cfg.task.max_len),
                                  scan_layers=self.cfg.model_defaults.scan_layers,
                                  remat_policy=self.cfg.model_defaults.remat_policy)
        rng = jax.random.PRNGKey(self.cfg.seed * 1000 + zlib.crc32(name.encode()) % 1000)
        init = jax.jit(lambda r: nn.meta.unbox(train_lib.LlamaForCausalLM(lcfg).init(r, np.zeros((1, 8), np.int32))),
                       out_shardings={"params": train_lib.lm_param_shardings(lcfg, self.runtime)})
        pcfg = pcfg.copy_and_resolve_references()
        pcfg.steps = int(m.get("pretrain_steps", 0) or pcfg.steps)
        self.lm_train(f"pretrain_{name}", lcfg, {"lm": init(rng)["params"]}, self.corpus, pcfg, out)

    def lm_train(self, run: str, lcfg, params, texts: list[str], lmcfg, out_dir: str) -> None:
        """Next-token training on texts (pretraining, generative finetuning); saves a HF checkpoint to out_dir."""
        tok = self.tokenizer
        ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        blocks = batching.lm_blocks(ids, lmcfg.seq_len, tok.eos_token_id)
        tx = train_lib.make_optimizer(lmcfg, lmcfg.steps, lmcfg.lr)
        abstract, shardings = train_lib.state_shardings(lcfg, None, tx, self.runtime)
        state = train_lib.create_state(params, tx, shardings)
        step = train_lib.jit_step(train_lib.make_lm_step(lcfg, tx, lmcfg.microbatches), shardings, self.runtime)
        order = batching.epoch_order(len(blocks), lmcfg.batch_size, self.cfg.seed, steps=lmcfg.steps)
        run_dir = self.path("runs", run)
        with MetricWriter(run_dir, enabled=self.is_main) as writer:
            state, _ = train_lib.run_loop(
                state=state, abstract_state=abstract, shardings=shardings, step_fn=step,
                get_batch=lambda s: {"blocks": blocks[order[s]]}, num_steps=lmcfg.steps,
                ckpt_dir=os.path.join(run_dir, "ckpt"), runtime=self.runtime,
                checkpoint_every=self.cfg.train.checkpoint_every, writer=writer, desc=run)
        convert.save_hf(lcfg, state.params["lm"], out_dir)  # every process calls it; process 0 writes
        if self.is_main:
            tok.save_pretrained(out_dir)
        train_lib.barrier(f"saved {out_dir}")

    def load_model(self, name: str):
        md = self.cfg.model_defaults
        return convert.load_hf(self.model_dir(name), dtype=md.dtype, param_dtype=md.param_dtype,
                               scan_layers=md.scan_layers, mesh=self.runtime.mesh, rules=self.runtime.rules)

    # -------------------------------------------------------------------------------------------- runs
    def train_and_predict(self, run: str, model: str, train_split: str, train_idx: list[int],
                          targets: list[np.ndarray], loss_name: str, label_sets: dict[str, str],
                          val: tuple[list[int], list[np.ndarray]] | None = None, val_kind: str = "weak_labels",
                          features_for: tuple[str, ...] = ()) -> dict:
        """Train `model` on examples `train_idx` of `train_split` with `targets`, then predict the test set and
        every split in `label_sets` ({label_name: split}). With early stopping on, `val` (examples and the targets
        that score them, described by `val_kind`) picks the best step. Skipped when its result file exists."""
        run_dir = self.path("runs", run)
        done_file = os.path.join(run_dir, "result.json")
        if os.path.isfile(done_file):
            log.info("%s: already done (%s)", run, done_file)
            with open(done_file) as f:
                return json.load(f)
        log.info("%s: training %s on %d examples of half %s with %s", run, model, len(train_idx), train_split,
                 loss_name)
        cfg, tcfg = self.cfg, self.cfg.train
        lcfg, lm_params = self.load_model(model)
        lcfg = lcfg.replace(remat_policy=cfg.model_defaults.remat_policy)
        label_ids = None
        if tcfg.head_init == "unembed":
            label_ids = [self.tokenizer(w, add_special_tokens=False)["input_ids"][-1]
                         for w in self.test[0]["candidates"]]
        head = heads.init_head(self.scoring, len(self.test[0]["candidates"]), lm_params, lcfg, tcfg.head_init,
                               label_ids)
        params = {"lm": lm_params} if head is None else {"lm": lm_params, "head": head}
        enc = [self.enc[train_split][i] for i in train_idx]
        order = batching.epoch_order(len(enc), tcfg.batch_size, cfg.seed, epochs=tcfg.epochs,
                                     lengths=[e["length"] for e in enc], group=tcfg.group_by_length)
        steps = len(order)
        lr = float(cfg.models[model.split("+")[0]].lr or tcfg.lr)
        tx = train_lib.make_optimizer(tcfg, steps, lr)
        abstract, shardings = train_lib.state_shardings(lcfg, head, tx, self.runtime)
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
            return batching.collate(items, self.scoring, tgt, b, k, batching.seq_bucket(items), t)

        predict = train_lib.make_predict_fn(lcfg, self.scoring, self.runtime, shardings.params)
        eval_fn = None
        if val is not None and tcfg.early_stopping != "none":
            v_idx, v_targets = val
            v_enc = [self.enc[train_split][i] for i in v_idx]
            v_labels = [int(np.argmax(t)) for t in v_targets]
            eval_fn = lambda st: metrics.accuracy([int(np.argmax(l)) for l in self._logits(predict, st.params, v_enc)],
                                                  [[l] for l in v_labels])
        with MetricWriter(run_dir, enabled=self.is_main) as writer:
            state, loop = train_lib.run_loop(
                state=state, abstract_state=abstract, shardings=shardings, step_fn=step, get_batch=get_batch,
                num_steps=steps, ckpt_dir=os.path.join(run_dir, "ckpt"), runtime=self.runtime,
                checkpoint_every=tcfg.checkpoint_every, eval_fn=eval_fn, eval_every=tcfg.eval_every,
                writer=writer, desc=run)
        result = {"run": run, "model": model, "steps": steps, "lr": lr, "loss": loss_name,
                  "early_stopping": val_kind if eval_fn else "none", "best_step": loop["best_step"],
                  "labels": {}}
        preds, texts = self.test_predictions(lcfg, predict, state, shardings)
        result["accuracy"] = metrics.accuracy(preds, accepts(self.test))
        result["test_predictions"] = preds
        result["eval_mode"] = self.cfg.eval.mode if self.scoring == "choice_lm" else "argmax"
        rows = [{"id": ex["id"], "label": ex["label"], "prediction": p, "accept": ex.get("accept", [ex["label"]]),
                 "correct": p in ex.get("accept", [ex["label"]])} for ex, p in zip(self.test, preds)]
        if texts is not None:
            for row, text in zip(rows, texts):
                row["generated"] = text
        if self.is_main:
            metrics.write_predictions(self.path("predictions", f"{run}.jsonl"), rows)
        for label_name, split in label_sets.items():
            logits = self._logits(predict, state.params, self.enc[split])
            exs = {"A": self.half_a, "B": self.half_b, "test": self.test}[split]
            probs = [softmax_valid(l, len(ex["candidates"])) for l, ex in zip(logits, exs)]
            path = os.path.join(run_dir, f"labels_{label_name}.jsonl")
            if self.is_main:
                metrics.atomic_write_text(path, "".join(
                    json.dumps({"id": ex["id"], "probs": [round(float(x), 7) for x in p]}) + "\n"
                    for ex, p in zip(exs, probs)))
            result["labels"][label_name] = path
        if features_for:  # for "finetune, then probe": the finetuned trunk's features
            from w2s_jax import probe
            result["features"] = {}
            for split in features_for:
                path = os.path.join(run_dir, f"features_{split}.npy")
                feats = probe.extract_features(lcfg, state.params["lm"], self.enc[split], self.cfg.probe.layer,
                                               self.runtime, self.cfg.eval.batch_size)
                if self.is_main:
                    np.save(path, feats)
                result["features"][split] = path
        self._write_json(done_file, result)
        train_lib.barrier(f"done {run}")  # labels and features written by process 0 are read next by all
        return result

    def test_predictions(self, lcfg, predict, state, shardings):
        """Predicted candidate index per test example: the best-scoring candidate, or for `eval.mode='greedy'` the
        greedily generated continuation (-1, i.e. wrong, when it is not a legal candidate). Returns (preds, texts)."""
        if self.scoring == "choice_lm" and self.cfg.eval.mode == "greedy":
            from w2s_jax import generate
            fn = generate.make_greedy_fn(lcfg, self.runtime, shardings.params["lm"], self.cfg.eval.max_new_tokens)
            return generate.greedy_predictions(
                lambda p, i, m: fn(p["lm"], i, m), state.params, self.tokenizer,
                [e["prompt"] for e in self.enc["test"]], [ex["candidates"] for ex in self.test],
                self.cfg.eval.batch_size)
        logits = self._logits(predict, state.params, self.enc["test"])
        return [int(np.argmax(l)) for l in logits], None

    def _logits(self, predict, params, enc, scoring=None) -> list[np.ndarray]:
        """Candidate logits for every encoded example (length-bucketed batches), in the original order."""
        out = [None] * len(enc)
        bs, scoring = self.cfg.eval.batch_size, scoring or self.scoring
        k, _, t = batching.max_shapes(enc, scoring)
        for idx, items in batching.prediction_batches(enc, bs):
            batch = batching.collate(items, scoring, None, bs, k, batching.seq_bucket(items), t)
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
    def validation_split(self, idx: list[int]) -> tuple[list[int], list[int]]:
        """Carve the validation examples for early stopping out of a training split (none when it is off)."""
        frac = self.cfg.train.val_frac if self.cfg.train.early_stopping != "none" else 0.0
        n_val = int(len(idx) * frac)
        return idx[n_val:], idx[:n_val]

    def run(self) -> dict:
        cfg, exp = self.cfg, self.cfg.experiment
        self.prepare_data()
        pairs = [tuple(p) for p in parse_chains(exp.pairs)]
        chains = parse_chains(exp.chains)
        losses, methods = parse_list(exp.losses), parse_list(exp.methods)
        gt_models = parse_list(exp.ground_truth) or self.ladder()
        for m in {m for p in pairs for m in p} | {m for c in chains for m in c}:
            if m not in gt_models:
                gt_models.append(m)
        order = [m for m in self.ladder() if m in gt_models]
        for m in order:
            self.ensure_model(m)
        self.supervisors = {p[0] for p in pairs} | {c[0] for c in chains}
        self.results = {"task": cfg.task.name, "models": {}, "runs": [], "notes": self.notes}

        # Ground truth on half A (the weak floor, the ceilings and the supervisors); supervisors also label half B.
        self.gt = {}
        for m in order:
            self.ground_truth(m)

        all_b = list(range(len(self.half_b)))
        for sup, stu in pairs:
            weak_labels = self.read_labels(self.gt[sup]["labels"]["B"], self.half_b)
            runs = {}
            for loss in losses:
                name = f"w2s_{sup}_to_{stu}_{loss}"
                feats = ("B", "test") if loss == "xent" and "finetune_probe" in methods else ()
                runs[loss] = self._student(name, stu, all_b, weak_labels, loss, {}, features_for=feats)
                self.add_student(name, runs[loss], stu, sup, loss, sup, self.gt[sup])
            self.run_methods(methods, sup, stu, weak_labels, all_b, runs.get("xent"))

        for chain in chains:
            # Bootstrapping: each step trains on its own slice of half B (fresh data per step, as the paper),
            # labelled by the previous model of the chain.
            parts = np.array_split(np.arange(len(self.half_b)), len(chain) - 1)
            prev_run, method = self.gt[chain[0]], "chain:" + "->".join(chain)
            for j, (sup, stu) in enumerate(zip(chain[:-1], chain[1:])):
                idx = [int(i) for i in parts[j]]
                labels = self.read_labels(prev_run["labels"]["B"], self.half_b)
                name = f"chain_{'-'.join(chain)}_{exp.chain_loss}_step{j + 1}"
                label_sets = {"B": "B"} if j < len(chain) - 2 else {}
                res = self._student(name, stu, idx, labels, exp.chain_loss, label_sets)
                self.add_student(name, res, stu, chain[0], method, sup, prev_run)["loss"] = exp.chain_loss
                prev_run = res

        if self.is_main:
            report.write_report(self.results, self.workdir)
        return self.results

    def ground_truth(self, m: str) -> None:
        """Train model m on half A's ground truth; a supervisor also labels half B."""
        lcfg = convert.config_from_hf(json.load(open(os.path.join(self.model_dir(m), "config.json"))))
        self.results["models"][m] = {"params": lcfg.num_params,
                                     "non_embedding_params": lcfg.num_non_embedding_params}
        tr_a, val_a = self.validation_split(list(range(len(self.half_a))))
        self.gt[m] = self.train_and_predict(
            f"gt_{m}", m, "A", tr_a, one_hot_targets([self.half_a[i] for i in tr_a]), "xent",
            {"B": "B"} if m in self.supervisors else {},
            val=(val_a, one_hot_targets([self.half_a[i] for i in val_a])), val_kind="ground_truth")
        self.results["runs"].append({"name": f"gt_{m}", "role": "weak" if m in self.supervisors else "ceiling",
                                     "model": m, "supervisor": None, "method": GT,
                                     "accuracy": self.gt[m]["accuracy"],
                                     "early_stopping": self.gt[m]["early_stopping"]})

    def run_methods(self, methods, sup, stu, weak_labels, idx, xent_run) -> None:
        """The elicitation methods beyond finetuning for one (supervisor, student) pair (elicitation.py)."""
        from w2s_jax import elicitation as E
        unknown = sorted(set(methods) - set(E.METHODS))
        if unknown:
            raise ValueError(f"experiment.methods: unknown {unknown}; valid methods are {list(E.METHODS)}")
        add_gt = lambda res, model, method: self.results["runs"].append(
            {"name": res["run"], "role": "ceiling", "model": model, "supervisor": None, "method": method,
             "accuracy": res["accuracy"], "early_stopping": "none"})
        if "probe" in methods:
            ceiling = E.ground_truth_probe(self, stu)
            add_gt(ceiling, stu, "probe")
            res = E.weak_probe(self, sup, stu, weak_labels)
            self.add_student(res["run"], res, stu, sup, "probe", sup, self.gt[sup], ceiling=ceiling["accuracy"])
        if "finetune_probe" in methods:
            if xent_run is None:
                raise ValueError("experiment.methods 'finetune_probe' needs 'xent' in experiment.losses")
            res = E.finetune_then_probe(self, sup, stu, weak_labels, xent_run)
            self.add_student(res["run"], res, stu, sup, "finetune_probe", sup, self.gt[sup])
        if "genft" in methods:
            derived = E.generative_finetune(self, stu)
            self.ground_truth(derived)
            name = f"w2s_{sup}_to_{derived}_xent"
            res = self._student(name, derived, idx, weak_labels, "xent", {})
            self.add_student(name, res, derived, sup, "genft+xent", sup, self.gt[sup])
        if "zero_shot" in methods:
            res = E.zero_shot(self, stu)
            self.results["runs"].append({"name": res["run"], "role": "baseline", "model": stu, "supervisor": None,
                                         "method": "zero_shot", "accuracy": res["accuracy"],
                                         "early_stopping": "none"})
        if "few_shot" in methods:
            res = E.few_shot(self, sup, stu, weak_labels)
            self.add_student(res["run"], res, stu, sup, "few_shot", sup, self.gt[sup])

    def _student(self, name, model, idx, labels, loss, label_sets, features_for=()):
        tr, val = self.validation_split(idx)
        oracle = self.cfg.train.early_stopping == "ground_truth_oracle"
        val_targets = (one_hot_targets([self.half_b[i] for i in val]) if oracle else [labels[i] for i in val])
        return self.train_and_predict(name, model, "B", tr, [labels[i] for i in tr], loss, label_sets,
                                      val=(val, val_targets), features_for=features_for,
                                      val_kind="ground_truth_oracle" if oracle else "weak_labels")

    def add_student(self, name, res, student, weak, method, direct_sup, sup_run, ceiling=None) -> dict:
        """Append a student's row: accuracy, PGR between the weak model and the ceiling (the student trained on
        ground truth, or `ceiling` for methods with their own), and (error) agreement with its direct supervisor."""
        acc_weak = self.gt[weak]["accuracy"]
        acc_ceiling = self.gt[student]["accuracy"] if ceiling is None else ceiling
        sup_preds = sup_run["test_predictions"]
        row = {"name": name, "role": "student", "model": student, "supervisor": weak,
               "direct_supervisor": direct_sup, "supervisor_run": sup_run["run"], "method": method,
               "accuracy": res["accuracy"],
               "pgr": metrics.pgr(res["accuracy"], acc_weak, acc_ceiling),
               "agreement": metrics.agreement(res["test_predictions"], sup_preds),
               "error_agreement": metrics.error_agreement(res["test_predictions"], sup_preds, accepts(self.test)),
               "early_stopping": res["early_stopping"]}
        self.results["runs"].append(row)
        return row
