"""Elicitation methods beyond finetuning (paper sections 5.1-5.3): linear probes on frozen features, finetune-then-
probe, generative finetuning, and zero/few-shot prompting. Each is a stage of an `Experiment` (pipeline.py) that
writes its result into the current seed's folder and is reused while its fingerprint (config keys and input
digests) is unchanged; each yields result rows like any other method.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from w2s_jax import fingerprint, probe
from w2s_jax.data import batching, prompting
from w2s_jax import train as train_lib

METHODS = ("probe", "finetune_probe", "genft", "zero_shot", "few_shot")


def model_features(exp, model: str, layer: int | None = None, prompt_states: bool = False,
                   pooling: str = "last") -> dict[str, np.ndarray]:
    """Frozen features of a (pretrained, not finetuned) model at its probe layer (or `layer`), at the prompt's last
    token or averaged over its tokens (`pooling`, `probe.extract_features`), for the training pool
    and the test set, cached in the workdir (shared by the seeds) under names holding the digests of the weights, of
    the dtypes and of the examples, so a changed input never reuses stale features. The model is loaded once, only
    if a file is missing. With `prompt_states`, the hidden state at every prompt token
    (`probe.extract_prompt_states`: what a top-layers model reads) instead of at the last one."""
    layer = exp.feature_layer(model) if layer is None else layer
    if prompt_states:
        extract, kind = probe.extract_prompt_states, "states"
    else:
        extract = functools.partial(probe.extract_features, pooling=pooling)
        kind = {"last": "layer", "mean": "mean"}[probe.check_pooling(pooling)]
    splits = {"train": (exp.train, exp.enc["train"]), "test": (exp.test, exp.enc["test"])}
    loaded = []

    def compute(enc):
        if not loaded:
            loaded.append(exp.load_model(model))
        lcfg, lm = loaded[0]
        return extract(lcfg, lm, enc, layer, exp.runtime, exp.cfg.eval.batch_size)

    md = exp.cfg.model_defaults  # the dtypes the forward pass runs in
    weights = fingerprint.digest([exp.model_digest(model), md.dtype, md.param_dtype])
    out = {}
    for split, (examples, enc) in splits.items():
        key = f"{weights[:8]}_{exp.examples_digest(examples)[:8]}"
        path = os.path.join(exp.root, "features", f"{model}_{kind}{layer}_{split}_{key}.npy")
        out[split] = probe.cached_features(path, lambda: compute(enc))
    return out


def _fit_probe(exp, feats, targets):
    p = exp.cfg.probe
    n_val = int(len(feats) * p.val_frac)
    val = (feats[:n_val], targets[:n_val]) if n_val else None
    return probe.train_logreg(feats[n_val:], targets[n_val:], l2=p.l2, lr=p.lr, epochs=p.epochs,
                              batch_size=p.batch_size, seed=exp.seed, val=val, patience=p.patience)


def probe_run(exp, name, train_feats, targets, test_feats, inputs: dict) -> dict:
    """Train a logistic-regression probe on (features, soft targets); predict the test set. `inputs` are the
    digests of what the features came from (they join the stage's fingerprint)."""
    spec = {**inputs, "seed": exp.seed, "test_examples": exp.digests["test"],
            **{f"probe.{k}": v for k, v in exp.cfg.probe.to_dict().items()},
            "features": fingerprint.array_digest(train_feats), "test_features": fingerprint.array_digest(test_feats),
            "targets": fingerprint.digest([np.round(t, 7).tolist() for t in targets])}

    def compute():
        from w2s_jax.pipeline import stack_targets
        params = _fit_probe(exp, train_feats, stack_targets(targets))
        preds = [int(p) for p in probe.probe_predict(params, test_feats)]
        return {"run": name, "early_stopping": "none", **exp.score_test(name, preds)}
    return exp.cached(name, spec, compute, outputs=(exp.path("predictions", f"{name}.jsonl"),))


def ground_truth_probe(exp, model: str) -> dict:
    """The probe's own ceiling: a probe on the model's frozen features trained on half A's ground truth."""
    from w2s_jax.pipeline import one_hot_targets
    return probe_run(exp, f"gt_probe_{model}", exp.features(model, "A"), one_hot_targets(exp.half_a),
                     exp.features(model, "test"),
                     {"model_weights": exp.model_digest(model), "train_examples": exp.examples_digest(exp.half_a)})


def weak_probe(exp, sup: str, stu: str, weak_labels, idx: list[int]) -> dict:
    """A probe on the student's frozen features of half B's examples `idx`, trained on their weak labels."""
    examples = [exp.half_b[i] for i in idx]
    return probe_run(exp, f"w2s_{sup}_to_{stu}_probe", exp.features(stu, "B")[idx], weak_labels,
                     exp.features(stu, "test"),
                     {"model_weights": exp.model_digest(stu), "train_examples": exp.examples_digest(examples)})


def finetune_then_probe(exp, stu: str, finetuned_run: dict) -> dict:
    """The paper's saliency analysis (Burns et al. 2023, sec. 5.3): the student finetuned on weak labels (half B,
    naive loss), frozen; a linear probe on its features trained on half A's ground truth, scored on the test set.
    Compared with `probe`'s ceiling (the same probe on the pretrained features) it shows whether weak-label
    finetuning made the task more linearly salient. It uses ground truth, so it is an analysis, not a
    weak-to-strong method, and gets no PGR."""
    from w2s_jax.pipeline import one_hot_targets
    feats = {s: np.load(finetuned_run["features"][s]) for s in ("A", "test")}
    return probe_run(exp, f"finetune_probe_{finetuned_run['run']}", feats["A"], one_hot_targets(exp.half_a),
                     feats["test"], {"finetuned_run": finetuned_run["fingerprint"],
                                     "train_examples": exp.examples_digest(exp.half_a)})


def generative_finetune(exp, model: str) -> str:
    """Unsupervised LM finetuning of `model` on the task's training texts (no labels); returns the derived name.

    The derived model `<model>+genft` is saved as a HF checkpoint and can be used like any model of the ladder.
    """
    name = f"{model}+genft"
    out = exp.path("models", name)
    texts = [ex["prompt"] for ex in exp.half_a + exp.half_b]
    spec = {**{f"genft.{k}": v for k, v in exp.cfg.genft.to_dict().items()}, "seed": exp.seed,
            "model_weights": exp.model_digest(model), "texts": fingerprint.digest(texts),
            "tokenizer": exp.digests["tokenizer"]}
    exp.open_stage(out, spec, outputs=(exp.path("runs", f"genft_{model}"),))
    if not os.path.isfile(os.path.join(out, "config.json")):
        lcfg, lm = exp.load_model(model)
        exp.lm_train(exp.path("runs", f"genft_{model}"), lcfg, {"lm": lm}, texts, exp.cfg.genft, out)
    exp.derived[name] = out
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
        return {"run": name, "early_stopping": "none", **exp.score_test(name, preds)}
    spec = {"model_weights": exp.model_digest(model), "test_examples": exp.digests["test"]}
    return exp.cached(name, spec, compute, outputs=(exp.path("predictions", f"{name}.jsonl"),))


def few_shot(exp, sup: str, stu: str, weak_labels) -> dict:
    """Few-shot prompting of the student with k examples of half B labelled by the supervisor (weak labels)."""
    name = f"w2s_{sup}_to_{stu}_few_shot"

    def compute():
        pool = [dict(ex, label=int(np.argmax(w))) for ex, w in zip(exp.half_b, weak_labels)]
        shots = prompting.pick_shots(pool, exp.cfg.few_shot.k, exp.seed, balanced=exp.scoring == "classify")
        preds = _score_prompts(exp, stu, prompt_examples(exp, exp.test, shots))
        return {"run": name, "early_stopping": "none", "shots": [s["id"] for s in shots],
                **exp.score_test(name, preds)}
    spec = {"model_weights": exp.model_digest(stu), "test_examples": exp.digests["test"], "seed": exp.seed,
            "few_shot.k": exp.cfg.few_shot.k, "weak_labels": fingerprint.digest(
                [np.round(w, 7).tolist() for w in weak_labels]), "half_b": exp.examples_digest(exp.half_b)}
    return exp.cached(name, spec, compute, outputs=(exp.path("predictions", f"{name}.jsonl"),))
