"""The experiment's plan without training: group-preserving splits, stage fingerprints, config refusals."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import chess as chess_config, sciq as sciq_config
from w2s_jax import fingerprint, pipeline
from w2s_jax.models import convert, presets
from w2s_jax.models.llama import LlamaForCausalLM


def _examples(sizes):
    """Groups of the given sizes: ids g<k>_<i>, group g<k>."""
    return [{"id": f"g{k}_{i}", "group": f"g{k}"} for k, n in enumerate(sizes) for i in range(n)]


def test_halves_validation_and_chain_slices_keep_groups_whole():
    examples = _examples([1, 4, 2, 3, 1, 5, 2, 2, 6, 1, 3, 4] * 5)
    groups = [pipeline.group_of(ex) for ex in examples]
    for seed in range(5):
        a, b = pipeline.split_halves(examples, seed)
        assert sorted(a + b) == list(range(len(examples)))
        assert not {groups[i] for i in a} & {groups[i] for i in b}
        assert abs(len(a) - len(b)) <= 12  # at most about one group off the middle
        parts = pipeline.cut_at_groups(b, groups, [1 / 3, 2 / 3])
        assert len(parts) == 3 and sum(parts, []) == b
        for x in range(3):
            for y in range(x):
                assert not {groups[i] for i in parts[x]} & {groups[i] for i in parts[y]}
    assert pipeline.split_halves(examples, 0) == pipeline.split_halves(examples, 0)
    assert pipeline.split_halves(examples, 0) != pipeline.split_halves(examples, 1)


def test_examples_without_groups_split_one_by_one():
    examples = [{"id": str(i)} for i in range(10)]
    a, b = pipeline.split_halves(examples, 0)
    assert len(a) == len(b) == 5


def test_validation_carve_out_keeps_groups_whole(tmp_path):
    cfg = chess_config.get_config("smoke")
    cfg.train.early_stopping = "weak_labels"
    cfg.train.val_frac = 0.25
    exp = pipeline.Experiment(cfg, str(tmp_path))
    examples = _examples([3, 3, 3, 3, 3, 3, 3, 3])
    train, val = exp.validation_split(list(range(len(examples))), examples)
    assert len(val) == 6 and sorted(train + val) == list(range(24))


def test_a_stage_is_reused_only_while_its_fingerprint_matches(tmp_path, caplog):
    exp = pipeline.Experiment(chess_config.get_config("smoke"), str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        os.makedirs(exp.path("runs", "run", "ckpt"), exist_ok=True)  # a checkpoint made under these inputs
        return {"run": "run", "accuracy": 0.5}

    spec = {"train.lr": 1e-3, "losses.logconf.aux_coef": 0.5, "model_weights": "abc"}
    first = exp.cached("run", spec, compute)
    assert exp.cached("run", dict(spec), compute) == first and len(calls) == 1
    with caplog.at_level("WARNING"):
        exp.cached("run", {**spec, "losses.logconf.aux_coef": 0.3}, compute)
    assert len(calls) == 2
    assert "losses.logconf.aux_coef: 0.5 -> 0.3" in caplog.text and "train.lr" not in caplog.text
    # an interrupted stage under other inputs leaves a checkpoint: it is deleted, never resumed
    os.remove(exp.path("runs", "run", "result.json"))
    stale = exp.path("runs", "run", "ckpt", "7")
    os.makedirs(stale)
    exp.cached("run", {**spec, "train.lr": 2e-3}, compute)
    assert not os.path.exists(stale) and len(calls) == 3
    with open(exp.path("runs", "run", "fingerprint.json")) as f:
        assert json.load(f)["spec"]["train.lr"] == 2e-3


def test_train_spec_names_what_determines_a_run(tmp_path):
    cfg = chess_config.get_config("smoke")
    exp = pipeline.Experiment(cfg, str(tmp_path))
    exp.digests.update({"test": "t", "model:strong": "w"})
    spec = exp.train_spec("strong", "logconf")
    assert spec["losses.logconf.aux_coef"] == 0.5 and spec["train.epochs"] == 1.0 and spec["seed"] == 0
    assert spec["models.strong.lr"] == cfg.models.strong.lr and spec["model_weights"] == "w"
    assert "losses.product.alpha" not in spec  # another loss's settings do not determine this run


def test_model_defaults_reach_the_models_the_runs_load(tmp_path):
    """The attention (like the dtypes and scan) is the config's, whatever the checkpoint says, and a run's spec
    names it."""
    cfg = chess_config.get_config("smoke")
    cfg.model_defaults.update(attention="jax", dtype="bfloat16")
    exp = pipeline.Experiment(cfg, str(tmp_path))
    lcfg = presets.get_preset("micro-s", vocab_size=50)
    params = nn.meta.unbox(LlamaForCausalLM(lcfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    convert.save_hf(lcfg, params, exp.model_dir("weak"))
    loaded, _ = exp.load_model("weak")
    assert (loaded.attention, loaded.dtype, loaded.hidden_size) == ("jax", "bfloat16", lcfg.hidden_size)
    exp.digests.update({"test": "t", "model:weak": "w"})
    assert exp.train_spec("weak", "xent")["model_defaults.attention"] == "jax"


@pytest.mark.parametrize("method", ["probe", "finetune_probe"])
def test_probes_are_refused_on_chess(method):
    cfg = chess_config.get_config("smoke")
    cfg.experiment.methods = method
    with pytest.raises(ValueError, match=f"'{method}' needs a fixed set of classes, but task.scoring='choice_lm'"):
        pipeline.validate_config(cfg)
    cfg = sciq_config.get_config("smoke")
    cfg.experiment.methods = method
    pipeline.validate_config(cfg)


@pytest.mark.parametrize("key, value, message", [
    ("seeds", "0,x", "experiment.seeds='0,x': expected comma-separated integers"),
    ("seeds", "1,1", "expected one or more distinct integers"),
    ("pair_examples", "half", "experiment.pair_examples='half'"),
])
def test_bad_experiment_settings_are_refused(key, value, message):
    cfg = chess_config.get_config("smoke")
    cfg.experiment[key] = value
    with pytest.raises(ValueError, match=message):
        pipeline.validate_config(cfg)


def test_unknown_tokenizer_split_is_refused():
    cfg = chess_config.get_config("smoke")
    cfg.tokenizer.split = "chars"
    with pytest.raises(ValueError, match="tokenizer.split='chars': expected one of word, san"):
        pipeline.validate_config(cfg)


@pytest.mark.parametrize("config, updates, message", [
    ("chess", {"trainable_layers": 2}, "train.trainable_layers=2 finetunes the top layers on the prompt's hidden "
                                        "states, which needs task.scoring='classify', not 'choice_lm'"),
    ("sciq", {"trainable_layers": -1}, r"train.trainable_layers=-1: expected 0 \(train every layer\)"),
    ("sciq", {"trainable_layers": 1, "methods": "finetune_probe"}, "'finetune_probe' probes the finetuned model's "
                                                                   "layer probe.layer, which train.trainable_layers=1"),
    ("sciq", {"length_multiple": 0}, "train.length_multiple=0: expected a positive integer"),
    ("sciq", {"head_init": "linear"}, "train.head_init='linear': expected 'zero', 'unembed' or 'probe'"),
    ("chess", {"head_init": "probe"}, "train.head_init='probe' starts a classification head, which needs "
                                      "task.scoring='classify', not 'choice_lm'"),
])
def test_bad_train_settings_are_refused(config, updates, message):
    cfg = {"chess": chess_config, "sciq": sciq_config}[config].get_config("smoke")
    if "methods" in updates:
        cfg.experiment.methods = updates.pop("methods")
    cfg.train.update(updates)
    with pytest.raises(ValueError, match=message):
        pipeline.validate_config(cfg)


def test_pair_examples_chain_step_needs_a_chain():
    cfg = chess_config.get_config("smoke")
    cfg.experiment.update(pair_examples="chain_step", chains="")
    with pytest.raises(ValueError, match="experiment.chains is empty"):
        pipeline.validate_config(cfg)


def test_the_shipped_chess_ladder_is_what_its_recipe_makes():
    """configs/chess.py:ladder: the checkpoints in data/chess/ladder validate, the rungs grow in size, and the
    manifest says they came from `ladder_scratch` (its steps, tokenizer split and corpus)."""
    from w2s_jax.data import chess as chess_data
    from w2s_jax.models import convert
    cfg, recipe = chess_config.get_config("ladder"), chess_config.get_config("ladder_scratch")
    pipeline.validate_config(cfg)
    sizes = [convert.checkpoint_config(cfg.models[m].checkpoint).num_non_embedding_params
             for m in ("weak", "mid", "strong")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    with open(os.path.join(chess_config.LADDER_DIR, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["preset"] == "ladder_scratch" and manifest["tokenizer_split"] == recipe.tokenizer.split == "san"
    assert {m: manifest["models"][m]["steps"] for m in recipe.models} == {
        m: recipe.models[m].pretrain_steps for m in recipe.models}
    assert manifest["corpus"] == fingerprint.digest(chess_data.read_corpus(recipe.task.corpus_path))
    tokenizer = convert.load_tokenizer(cfg.models.strong.checkpoint)
    assert tokenizer.tokenize(" Nxf7+") == ["ĠNx", "f7", "+"]
