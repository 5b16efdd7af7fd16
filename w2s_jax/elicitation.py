"""Elicitation methods beyond finetuning (paper sections 5.1-5.3): linear probes on frozen features, finetune-then-
probe, generative finetuning, and zero/few-shot prompting. Each is a stage of an `Experiment` (pipeline.py) that
writes its result into the workdir and is skipped when done; each yields result rows like any other method.
"""
from __future__ import annotations

import json
import os

import numpy as np

from w2s_jax import metrics, probe
from w2s_jax.data import batching, prompting
from w2s_jax import train as train_lib

METHODS = ("probe", "finetune_probe", "genft", "zero_shot", "few_shot")


def _cached_result(exp, name, compute):
    path = exp.path("runs", name, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    exp._write_json(path, result)
    train_lib.barrier(f"done {name}")
    return result


def _write_test_predictions(exp, name, preds):
    rows = [{"id": ex["id"], "label": ex["label"], "prediction": int(p), "accept": ex.get("accept", [ex["label"]]),
             "correct": int(p) in ex.get("accept", [ex["label"]])} for ex, p in zip(exp.test, preds)]
    if exp.is_main:
        metrics.write_predictions(exp.path("predictions", f"{name}.jsonl"), rows)


def model_features(exp, model: str, split: str) -> np.ndarray:
    """Frozen features of a (pretrained, not finetuned) model at `experiment.probe_layer`, cached per split."""
    layer = exp.cfg.probe.layer
    path = exp.path("features", f"{model}_layer{layer}_{split}.npy")

    def compute():
        lcfg, lm = exp.load_model(model)
        return probe.extract_features(lcfg, lm, exp.enc[split], layer, exp.runtime, exp.cfg.eval.batch_size)
    return probe.cached_features(path, compute)


def _fit_probe(exp, feats, targets, seed_offset=0):
    p = exp.cfg.probe
    n_val = int(len(feats) * p.val_frac)
    val = (feats[:n_val], targets[:n_val]) if n_val else None
    return probe.train_logreg(feats[n_val:], targets[n_val:], l2=p.l2, lr=p.lr, epochs=p.epochs,
                              batch_size=p.batch_size, seed=exp.cfg.seed + seed_offset, val=val, patience=p.patience)


def _stack(targets):
    k = max(len(t) for t in targets)
    out = np.zeros((len(targets), k), np.float32)
    for i, t in enumerate(targets):
        out[i, :len(t)] = t
    return out


def probe_run(exp, name, train_feats, targets, test_feats) -> dict:
    """Train a logistic-regression probe on (features, soft targets); predict the test set."""
    def compute():
        params = _fit_probe(exp, train_feats, _stack(targets))
        preds = [int(p) for p in probe.probe_predict(params, test_feats)]
        _write_test_predictions(exp, name, preds)
        return {"run": name, "accuracy": metrics.accuracy(preds, [e.get("accept", [e["label"]]) for e in exp.test]),
                "test_predictions": preds, "early_stopping": "none"}
    return _cached_result(exp, name, compute)


def ground_truth_probe(exp, model: str) -> dict:
    """The probe's own ceiling: a probe on the model's frozen features trained on half A's ground truth."""
    from w2s_jax.pipeline import one_hot_targets
    return probe_run(exp, f"gt_probe_{model}", model_features(exp, model, "A"), one_hot_targets(exp.half_a),
                     model_features(exp, model, "test"))


def weak_probe(exp, sup: str, stu: str, weak_labels) -> dict:
    return probe_run(exp, f"w2s_{sup}_to_{stu}_probe", model_features(exp, stu, "B"), weak_labels,
                     model_features(exp, stu, "test"))


def finetune_then_probe(exp, sup: str, stu: str, weak_labels, finetuned_run: dict) -> dict:
    """'Finetune on weak labels, then probe': a probe on the weak-label-finetuned student's features."""
    feats = {s: np.load(finetuned_run["features"][s]) for s in ("B", "test")}
    return probe_run(exp, f"w2s_{sup}_to_{stu}_finetune_probe", feats["B"], weak_labels, feats["test"])


def generative_finetune(exp, model: str) -> str:
    """Unsupervised LM finetuning of `model` on the task's training texts (no labels); returns the derived name.

    The derived model `<model>+genft` is saved as a HF checkpoint and can be used like any model of the ladder.
    """
    name = f"{model}+genft"
    out = exp.path("models", name)
    exp.derived[name] = out
    if os.path.isfile(os.path.join(out, "config.json")):
        return name
    g = exp.cfg.genft
    lcfg, lm = exp.load_model(model)
    texts = [ex["prompt"] for ex in exp.half_a + exp.half_b]
    exp.lm_train(f"genft_{model}", lcfg, {"lm": lm}, texts, g, out)
    return name


def _score_prompts(exp, model: str, examples: list[dict]) -> list[int]:
    """Argmax over the candidates' log-likelihoods under the pretrained LM head (choice_lm scoring)."""
    lcfg, lm = exp.load_model(model)
    enc, dropped = batching.encode_examples(examples, exp.tokenizer, "choice_lm", 10 ** 9)
    predict = train_lib.make_predict_fn(lcfg, "choice_lm", exp.runtime,
                                        {"lm": train_lib.lm_param_shardings(lcfg, exp.runtime)})
    logits = exp._logits(predict, {"lm": lm}, enc, "choice_lm")
    return [int(np.argmax(l)) for l in logits]


def prompt_examples(exp, examples: list[dict], shots: list[dict] | None) -> list[dict]:
    """Zero/few-shot versions of examples. Classification tasks get the task's template and label words; LM-scored
    tasks (chess) are already prompts whose candidates are continuations, so shots are prepended as solved ones."""
    if exp.scoring == "classify":
        template, words = prompting.default_template(exp.cfg.task.name)
        if shots:
            return [prompting.few_shot_example(ex, shots, template, words) for ex in examples]
        return [prompting.zero_shot_example(ex, template, words) for ex in examples]
    if not shots:
        return examples
    prefix = "\n".join(s["prompt"] + s["candidates"][s["label"]] for s in shots) + "\n"
    return [dict(ex, prompt=prefix + ex["prompt"]) for ex in examples]


def zero_shot(exp, model: str) -> dict:
    name = f"zero_shot_{model}"

    def compute():
        preds = _score_prompts(exp, model, prompt_examples(exp, exp.test, None))
        _write_test_predictions(exp, name, preds)
        return {"run": name, "accuracy": metrics.accuracy(preds, [e.get("accept", [e["label"]]) for e in exp.test]),
                "test_predictions": preds, "early_stopping": "none"}
    return _cached_result(exp, name, compute)


def few_shot(exp, sup: str, stu: str, weak_labels) -> dict:
    """Few-shot prompting of the student with k examples of half B labelled by the supervisor (weak labels)."""
    name = f"w2s_{sup}_to_{stu}_few_shot"

    def compute():
        pool = [dict(ex, label=int(np.argmax(w))) for ex, w in zip(exp.half_b, weak_labels)]
        shots = prompting.pick_shots(pool, exp.cfg.few_shot.k, exp.cfg.seed, balanced=exp.scoring == "classify")
        preds = _score_prompts(exp, stu, prompt_examples(exp, exp.test, shots))
        _write_test_predictions(exp, name, preds)
        return {"run": name, "accuracy": metrics.accuracy(preds, [e.get("accept", [e["label"]]) for e in exp.test]),
                "test_predictions": preds, "early_stopping": "none", "shots": [s["id"] for s in shots]}
    return _cached_result(exp, name, compute)
