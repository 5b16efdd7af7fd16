"""End to end through launch/main.py: every reported number recomputes from the written predictions."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from w2s_jax import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "main.py"), *args], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": "", **(env or {})},
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch/main.py {args} failed:\n{proc.stderr[-4000:]}")
    return proc


def check_results_consistent(workdir):
    """results.json agrees with every seed's predictions/*.jsonl (accuracy, PGR, agreement, error agreement), and
    each reported number is the mean of the seeds' values, inside its 95% interval."""
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    seeds = results["seeds"]
    for seed in seeds:
        folder = workdir if len(seeds) == 1 else os.path.join(workdir, f"seed{seed}")
        runs = results["per_seed"][str(seed)]
        by_name = {r["name"]: r for r in runs}
        preds = {}
        for run in runs:
            rows = metrics.read_predictions(os.path.join(folder, "predictions", f"{run['name']}.jsonl"))
            assert run["accuracy"] == pytest.approx(metrics.accuracy_from_predictions(rows), abs=1e-12)
            assert all(r["answer"] is not None and "key" in r for r in rows)  # the candidate texts are there
            preds[run["name"]] = rows
        for run in runs:
            if run["role"] != "student":
                continue
            weak, ceiling = by_name[run["weak_run"]]["accuracy"], by_name[run["ceiling_run"]]["accuracy"]
            assert run["pgr"] == metrics.pgr(run["accuracy"], weak, ceiling)
            sup_rows = preds[run["supervisor_run"]]  # the run whose labels it trained on (a chain's previous step)
            stu = [r["key"] for r in preds[run["name"]]]
            sup = [r["key"] for r in sup_rows]
            assert run["agreement"] == pytest.approx(sum(a == b for a, b in zip(stu, sup)) / len(stu))
            wrong = [i for i, r in enumerate(sup_rows) if not r["correct"]]
            if wrong:
                assert run["error_agreement"] == pytest.approx(sum(stu[i] == sup[i] for i in wrong) / len(wrong))
    for run in results["runs"]:
        per_seed = [next(r for r in results["per_seed"][str(s)] if r["name"] == run["name"]) for s in seeds]
        assert run["accuracy_seeds"] == [r["accuracy"] for r in per_seed]
        assert run["accuracy"] == pytest.approx(sum(run["accuracy_seeds"]) / len(seeds))
        lo, hi = run["accuracy_ci"]
        assert lo - 1e-9 <= run["accuracy"] <= hi + 1e-9
    assert results["config"] and results["versions"]["jax"] and "command" in results
    devices = results["config"]["cpu_devices"] or os.cpu_count()  # run_main clears XLA_FLAGS
    assert results["devices"] == {"count": devices, "platform": "cpu", "processes": 1}
    assert os.path.isfile(os.path.join(workdir, "results.md"))
    assert os.listdir(os.path.join(workdir, "plots"))
    return results


def write_sciq(path, n, seed):
    """A sciq-shaped file (the dataset's real columns) whose answers follow a learnable rule."""
    r = random.Random(seed)
    topics = ["cell", "atom", "planet", "river", "enzyme", "magnet", "volcano", "photon", "glacier", "protein"]
    with open(path, "w") as f:
        for i in range(n):
            t = r.choice(topics)
            others = [f"the {o} answer" for o in topics if o != t]
            f.write(json.dumps({"question": f"What is special about the {t} in case {i % 7}?",
                                "correct_answer": f"the {t} answer", "distractor1": r.choice(others),
                                "distractor2": r.choice(others), "distractor3": r.choice(others),
                                "support": ""}) + "\n")


@pytest.mark.slow(140)
def test_sciq_local_files_end_to_end_with_every_method(tmp_path):
    write_sciq(tmp_path / "train.jsonl", 400, 0)
    write_sciq(tmp_path / "test.jsonl", 80, 1)
    workdir = str(tmp_path / "run")
    args = ["--config=configs/sciq.py:smoke", f"--workdir={workdir}",
            f"--config.task.data_files=train={tmp_path}/train.jsonl,test={tmp_path}/test.jsonl",
            "--config.experiment.methods=probe,finetune_probe,genft,zero_shot,few_shot",
            "--config.genft.steps=4", "--config.pretrain.steps=10"]
    first = run_main(*args)
    results = check_results_consistent(workdir)
    methods = {r["method"] for r in results["runs"]}
    assert {"ground_truth", "xent", "logconf", "probe", "finetune_probe", "genft+xent", "zero_shot",
            "few_shot"} <= methods
    by_name = {r["name"]: r for r in results["runs"]}
    assert by_name["w2s_weak_to_strong_probe"]["ceiling_run"] == "gt_probe_strong"
    assert by_name["finetune_probe_w2s_weak_to_strong_xent"]["role"] == "baseline"  # ground-truth probe: no PGR
    assert "Weak-to-strong results" in first.stdout
    # A rerun skips every stage and reports the same numbers.
    second = run_main(*args)
    assert ": training " not in second.stderr and "recomputing" not in second.stderr
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["runs"] == results["runs"]


@pytest.mark.slow(80)
def test_reward_modeling_pairwise_end_to_end(tmp_path):
    r = random.Random(0)
    for split, n in (("train", 300), ("test", 60)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                topic = r.choice(["tea", "maps", "bikes", "rain", "jazz"])
                f.write(json.dumps({"prompt": f"Human: tell me about {topic}\n\nAssistant:",
                                    "chosen": f" {topic} is nice and helpful {i % 5}",
                                    "rejected": f" no {r.choice(['idea', 'thanks'])}"}) + "\n")
    workdir = str(tmp_path / "run")
    run_main("--config=configs/reward.py:smoke", f"--workdir={workdir}",
             f"--config.task.data_files=train={tmp_path}/train.jsonl,test={tmp_path}/test.jsonl",
             "--config.experiment.losses=xent", "--config.pretrain.steps=10",
             "--config.train.early_stopping=weak_labels", "--config.train.eval_every=4")
    results = check_results_consistent(workdir)
    assert {r["method"] for r in results["runs"]} == {"ground_truth", "xent"}
    # early stopping on weak labels held out of half B (ground-truth runs: on ground truth held out of half A)
    assert {r["early_stopping"] for r in results["runs"] if r["role"] == "student"} == {"weak_labels"}
    assert {r["early_stopping"] for r in results["runs"] if r["role"] != "student"} == {"ground_truth"}
    with open(os.path.join(workdir, "runs", "w2s_weak_to_strong_xent", "result.json")) as f:
        assert json.load(f)["best_step"] is not None  # one seed: the runs sit in the workdir itself
    rows = metrics.read_predictions(os.path.join(workdir, "predictions", "gt_strong.jsonl"))
    assert len(rows) == 60 and all(len(r["accept"]) == 1 for r in rows)


@pytest.mark.slow(320)
def test_chess_smoke_end_to_end_with_fingerprints(tmp_path):
    """The chess smoke preset: ground truth, naive and logconf students and the weak->mid->strong chain, the
    direct pair on a chain step's data; then a changed loss setting reruns only the run it determines. One seed:
    the sentiment smoke test runs two, and the means and intervals over seeds are the same code."""
    workdir = str(tmp_path / "run")
    args = ["--config=configs/chess.py:smoke", f"--workdir={workdir}", "--config.experiment.seeds=0",
            "--config.experiment.pair_examples=chain_step"]
    run_main(*args)
    results = check_results_consistent(workdir)
    names = {r["name"] for r in results["runs"]}
    assert {"gt_weak", "gt_mid", "gt_strong", "w2s_weak_to_strong_xent", "w2s_weak_to_strong_logconf",
            "chain_weak-mid-strong_xent_step1", "chain_weak-mid-strong_xent_step2"} <= names
    by_name = {r["name"]: r for r in results["runs"]}
    assert by_name["chain_weak-mid-strong_xent_step1"]["chain_final"] is False
    assert by_name["chain_weak-mid-strong_xent_step2"]["method"] == "chain:weak->mid->strong"
    folder = os.path.join(workdir, "runs")  # one seed: the runs sit in the workdir itself
    rows = metrics.read_predictions(os.path.join(workdir, "predictions", "gt_strong.jsonl"))
    assert len(rows) == 64
    # the same number of examples for the direct pair and the chain's last step (the same slice)
    step = json.load(open(os.path.join(folder, "chain_weak-mid-strong_xent_step2", "result.json")))
    pair = json.load(open(os.path.join(folder, "w2s_weak_to_strong_xent", "result.json")))
    assert pair["train_examples"] == step["train_examples"]
    # labels are distributions over each puzzle's legal moves, stored with the example ids
    with open(os.path.join(folder, "gt_weak", "labels_B.jsonl")) as f:
        label = json.loads(f.readline())
    assert abs(sum(label["probs"]) - 1) < 1e-4 and isinstance(label["id"], str)

    # A changed config key reruns exactly the stages it determines, and says which key changed.
    rerun = run_main(*args, "--config.losses.logconf.aux_coef=0.3")
    assert rerun.stderr.count("recomputing, its inputs changed: losses.logconf.aux_coef: 0.5 -> 0.3") == 1
    trained = [line for line in rerun.stderr.splitlines() if ": training " in line]
    assert len(trained) == 1 and "w2s_weak_to_strong_logconf" in trained[0]
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["config"]["losses"]["logconf"]["aux_coef"] == 0.3


@pytest.mark.slow(75)
def test_sentiment_smoke_on_the_real_smollm2_and_real_labels(tmp_path):
    """The real-model config at smoke size: a micro LLaMA pretrained on the unrated train-side sentences, SmolLM2
    from its GGUF (cut to 1 and 2 layers), human-labelled movie snippets, probes on frozen features, two seeds, the
    random-flip control."""
    from w2s_jax import assets
    if not (assets.is_cached(assets.SMOLLM2) and assets.is_cached(assets.SENTIMENT)):
        pytest.skip("the assets are not cached: python -m w2s_jax.assets all")
    workdir = str(tmp_path / "run")
    run_main("--config=configs/sentiment.py:smoke", f"--workdir={workdir}", "--config.models.weak.probe_pooling=mean")
    results = check_results_consistent(workdir)
    by_name = {r["name"]: r for r in results["runs"]}
    assert {"gt_weak", "gt_strong", "w2s_weak_to_strong_xent", "control_weak_to_strong_random_flips",
            "gt_scratch", "w2s_scratch_to_strong_xent"} <= set(by_name)
    assert results["models"]["weak"]["non_embedding_params"] < results["models"]["strong"]["non_embedding_params"]
    assert 0.0 <= by_name["w2s_weak_to_strong_xent"]["ceiling_agreement"] <= 1.0
    assert any("rated snippets" in note for note in results["notes"])
    assert any("pretraining corpus:" in note for note in results["notes"])  # the scratch model's, no test text
    with open(os.path.join(workdir, "seed0", "runs", "gt_weak", "result.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k.startswith("probe") or k == "method"} == {
            "method": "probe", "probe_layer": -1, "probe_pooling": "mean"}
    # the weak model's probes read its mean state, the others their last token (the features cached apart)
    assert "probe features: scratch: the final normed state, the prompt's last token; weak: the final normed " \
           "state, the mean over the prompt's tokens; mid: the final normed state, the prompt's last token; " \
           "strong: the final normed state, the prompt's last token" in results["notes"]
    cached = {"_".join(name.split("_")[:3]) for name in os.listdir(os.path.join(workdir, "features"))}
    assert cached == {f"{m}_{split}" for m in ("scratch_layer-1", "weak_mean-1", "mid_layer-1", "strong_layer-1")
                      for split in ("train", "test")}


@pytest.mark.slow(30)
def test_probe_layers_scores_every_state_and_pooling_of_a_model(tmp_path):
    """launch/probe_layers.py on the smoke preset's 1-layer exit: both states (the embeddings and the final normed
    one) at the last token and averaged, cross-validated on half A's ground truth, written as a markdown table."""
    from w2s_jax import assets
    if not (assets.is_cached(assets.SMOLLM2) and assets.is_cached(assets.SENTIMENT)):
        pytest.skip("the assets are not cached: python -m w2s_jax.assets all")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "probe_layers.py"),
                           "--config=configs/sentiment.py:smoke", f"--workdir={tmp_path}", "--models=weak",
                           "--seeds=0", "--folds=2"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": ""}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "probe_layers.md") as f:
        rows = [line.split(" | ") for line in f.read().splitlines() if line.startswith("| weak |")]
    assert [r[1] for r in rows] == ["0", "1"]
    accs = [float(cell.strip("*")) for r in rows for cell in r[2:4]]
    assert all(0.0 <= a <= 1.0 for a in accs) and sum("**" in "".join(r) for r in rows) == 1  # one best
    # the last token of every prompt is the template's ':', so its embedding cannot tell the classes apart
    assert float(rows[0][2]) <= 0.6 < max(accs)


@pytest.mark.parametrize("flag, error", [
    ("--config.probe.pooling=max", "error: invalid config: probe.pooling='max': expected one of ['last', 'mean']"),
    ("--models=weak,foo", "error: --models: unknown model(s) ['foo']; the config has ['mid', 'scratch', 'strong', "
                          "'weak']"),
    ("--seeds=0,x", "error: --seeds='0,x': expected comma-separated integers such as '0,1'")])
def test_probe_layers_bad_input_ends_with_one_line(tmp_path, flag, error):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "probe_layers.py"),
                           "--config=configs/sentiment.py:smoke", f"--workdir={tmp_path}", flag], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == error and proc.returncode == 2


@pytest.mark.slow(150)
def test_sentiment_smoke_finetuning_the_top_layers(tmp_path):
    """The `finetune` preset's method at smoke size: each model's top layer finetuned on the hidden states of its
    frozen layers below, computed once and cached (the 1-layer exit trains whole), with the naive and the
    confidence loss; a rerun reuses every stage. The weak and strong models only (the others are the same code)."""
    from w2s_jax import assets
    if not (assets.is_cached(assets.SMOLLM2) and assets.is_cached(assets.SENTIMENT)):
        pytest.skip("the assets are not cached: python -m w2s_jax.assets all")
    workdir = str(tmp_path / "run")
    args = ["--config=configs/sentiment.py:smoke", f"--workdir={workdir}", "--config.experiment.seeds=0",
            "--config.train.method=finetune", "--config.train.trainable_layers=1", "--config.train.lr=1e-3",
            "--config.train.length_multiple=32", "--config.experiment.losses=xent,logconf",
            "--config.experiment.ground_truth=weak,strong", "--config.experiment.pairs=weak->strong",
            "--config.experiment.chains=", "--config.experiment.controls="]
    run_main(*args)
    results = check_results_consistent(workdir)
    assert {"gt_weak", "gt_strong", "w2s_weak_to_strong_xent", "w2s_weak_to_strong_logconf"} <= {
        r["name"] for r in results["runs"]}
    with open(os.path.join(workdir, "runs", "gt_strong", "result.json")) as f:
        assert json.load(f)["loss"] == "xent"  # finetuned, not probed
    cached = sorted(name.split("_")[:3] for name in os.listdir(os.path.join(workdir, "features")))
    # the inputs of the top layer of strong (3 layers); the 1-layer weak model has none
    assert cached == [["strong", "states2", split] for split in ("test", "train")]
    rerun = run_main(*args)
    assert ": training " not in rerun.stderr


@pytest.mark.slow(110)
def test_sentiment_smoke_head_initialised_from_a_probe(tmp_path):
    """`train.head_init='probe'` (linear probing, then finetuning): each head starts as a probe fitted on what it
    reads, the final normed state at the last prompt token. At a learning rate of 0 nothing moves, so the finetuned
    supervisor's labels are that probe's: fitted on the right examples and features, and read by the head through
    the top-layers path (the frozen lower layer's cached states)."""
    from w2s_jax import assets, elicitation, pipeline, probe
    from configs import sentiment
    if not (assets.is_cached(assets.SMOLLM2) and assets.is_cached(assets.SENTIMENT)):
        pytest.skip("the assets are not cached: python -m w2s_jax.assets all")
    workdir = str(tmp_path / "run")
    train = dict(method="finetune", trainable_layers=1, lr=0.0, length_multiple=32, head_init="probe")
    experiment = dict(seeds="0", losses="xent", ground_truth="mid", pairs="mid->strong", chains="", controls="")
    run_main("--config=configs/sentiment.py:smoke", f"--workdir={workdir}",
             *[f"--config.train.{k}={v}" for k, v in train.items()],
             *[f"--config.experiment.{k}={v}" for k, v in experiment.items()])
    cfg = sentiment.get_config("smoke")
    cfg.train.update(train)
    cfg.experiment.update(experiment)
    exp = pipeline.Experiment(cfg, workdir)
    exp.prepare_data()
    exp.use_seed(0)
    feats = elicitation.model_features(exp, "mid", layer=-1)["train"]  # the final state, as the head reads it
    p = cfg.probe
    kernel = probe.fit_head_kernel(feats[exp.idx["A"]], np.stack(pipeline.one_hot_targets(exp.half_a)), l2=p.l2,
                                   lr=p.lr, epochs=p.epochs, batch_size=p.batch_size, seed=0)
    logits = feats[exp.idx["B"]] @ kernel
    want = np.exp(logits - logits.max(-1, keepdims=True))
    with open(os.path.join(workdir, "runs", "gt_mid", "labels_B.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == [ex["id"] for ex in exp.half_b]
    np.testing.assert_allclose([r["probs"] for r in rows], want / want.sum(-1, keepdims=True), atol=1e-4)
    assert np.abs(kernel).max() > 0  # a fitted head, not the zero one
