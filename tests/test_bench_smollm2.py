"""bench/smollm2.py compares like with like: on a tiny GQA model with tied embeddings (SmolLM2's shape of model),
its PyTorch feature extraction and classify train step compute what ours do, from the same weights."""
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from bench import smollm2
from w2s_jax import assets
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=1e5)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    params = nn.meta.unbox(LlamaForCausalLM(CFG).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    params = jax.tree.map(np.asarray, params)
    batch = smollm2.synthetic_batch(CFG.vocab_size, 4, 16)
    batch["attention_mask"][1:, 11:] = 0  # right padding, as collate pads real prompts
    batch["input_ids"][1:, 11:] = 0
    batch["last_index"][1:] = 10
    return params, batch, smollm2.make_runtime(2)


def test_features_match(setup):
    params, batch, runtime = setup
    ours = smollm2.jax_features(CFG, params, batch, -1, runtime)()
    theirs = smollm2.torch_features(smollm2.torch_model(CFG, params, torch.get_num_threads()), batch, -1, "float32")()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", [1, -1])
def test_feature_jobs_match(setup, layer):
    # ours packs prompts into rows; PyTorch pads length-sorted batches and runs only the layers up to `layer`
    params, _, runtime = setup
    rng = np.random.default_rng(0)
    encoded = [{"prompt": rng.integers(3, CFG.vocab_size, n).tolist(), "cands": [[3], [4]], "length": n}
               for n in rng.integers(2, 30, 11)]
    ours = smollm2.jax_job(CFG, params, encoded, layer, runtime, 4)()
    model = smollm2.torch_model(CFG, params, torch.get_num_threads())
    theirs = smollm2.torch_job(model, encoded, layer, "float32", 4)()
    assert ours.shape == (11, CFG.hidden_size)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    whole = model(input_ids=torch.tensor([encoded[0]["prompt"]]), output_hidden_states=True).hidden_states[layer]
    np.testing.assert_allclose(theirs[0], whole[0, -1].detach().numpy(), atol=1e-5, rtol=1e-5)


def test_train_steps_match(setup):
    params, batch, runtime = setup
    ours = smollm2.jax_train_step(CFG, params, batch, runtime)
    theirs = smollm2.torch_train_step(smollm2.torch_model(CFG, params, torch.get_num_threads()), batch, "float32")
    losses = np.array([[ours(), theirs()] for _ in range(3)])
    assert losses[0, 0] == pytest.approx(np.log(2), abs=1e-6)  # zero-initialised head
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-4)
    assert losses[2, 0] < losses[0, 0]


def test_quick_defaults():
    args = smollm2.parse_args(["--quick", "--threads=2", "--seq=32"])
    assert (args.batch, args.rounds, args.seq, args.devices) == (4, 1, 32, [2])
    assert smollm2.parse_args(["--quick", "--batch=8", "--threads=2"]).batch == 8


def test_projection_shapes_cover_a_layer():
    # every kernel of a decoder layer, counted once: the matmul phase's per-layer time adds up the whole layer
    kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(
        nn.meta.unbox(LlamaForCausalLM(CFG).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]["layers_0"]))
        if path[-1].key == "kernel"]
    shapes = smollm2.projection_shapes(CFG)
    assert sum(count for _, count in shapes.values()) == len(kernels) == 7
    assert sorted(shape for shape, count in shapes.values() for _ in range(count)) == sorted(k.shape for k in kernels)


def test_matmul_kernels_compute_the_product():
    fns = smollm2.matmul_fns(CFG, 16, "float32", ("jax", "torch"))
    assert sorted(fns) == sorted(f"{fw}/f32 {name}" for fw in ("jax", "torch")
                                 for name in smollm2.projection_shapes(CFG))
    for name in smollm2.projection_shapes(CFG):
        np.testing.assert_allclose(np.asarray(fns[f"jax/f32 {name}"]()), fns[f"torch/f32 {name}"]().numpy(),
                                   rtol=1e-5, atol=1e-6)
    runs = {n: {"s": 0.5} for n in fns}
    summary = smollm2.matmul_summary(CFG, runs, 16, 3)
    # 7 kernels of 0.5 s; 3 layers for the features; the train step's 2 layers, each projection 3 times
    assert summary["jax/f32"] == {"layer_s": 3.5, "forward_s": 10.5, "train_s": 21.0}
    assert runs["jax/f32 down"]["gflop_s"] == 2 * 16 * 64 * 32 / 0.5 / 1e9


def test_ceiling_is_torch_time_over_projection_time():
    proj = {"jax/f32": {"forward_s": 2.0, "train_s": 8.0}, "torch/f32": {"forward_s": 1.0, "train_s": 5.0},
            "jax/bf16": {"forward_s": 0.5, "train_s": 2.0}}
    phases = {"matmul": {"projections": proj},
              "features": {"runs": {"jax/f32": {"s": 3.0}, "torch/f32": {"s": 3.0}}},
              "train": {"runs": {"jax/f32": {"s": 12.0}, "torch/f32": {"s": 10.0}, "jax/bf16": {"s": 4.0}}},
              "job": {"runs": {"jax/f32": {"s": 30.0}, "torch/f32": {"s": 24.0}}}}
    # ours in bfloat16 has no PyTorch bfloat16 run to compare with: no ceiling; the job is 4 batches' tokens
    assert smollm2.ceilings(phases, job_batches=4.0) == {"features": {"jax/f32": {"jax": 1.5, "torch": 3.0}},
                                                         "job": {"jax/f32": {"jax": 3.0, "torch": 6.0}},
                                                         "train": {"jax/f32": {"jax": 1.25, "torch": 2.0}}}


def test_isolate_refuses_the_matmul_phase(capsys):
    with pytest.raises(SystemExit):
        smollm2.parse_args(["--isolate=1", "--phases=train,matmul"])
    assert "the matmul phase times each kernel alone" in capsys.readouterr().err


def test_isolated_frameworks_train_alike(tmp_path):
    # --isolate=1: each framework's model in a worker process of its own, the steps interleaved over pipes; from
    # the same weights, two float32 steps give the same loss in both processes
    if not assets.is_cached(assets.SMOLLM2):
        pytest.skip("SmolLM2 GGUF not in the asset cache (python -m w2s_jax.assets smollm2)")
    out = tmp_path / "isolated.json"
    done = subprocess.run([sys.executable, "bench/smollm2.py", "--quick", "--seq=32", "--isolate=1", "--devices=1",
                           "--phases=train", "--dtypes=float32", "--torch_malloc=retain", f"--out={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[jax/f32] SmolLM2" in done.stdout and "[torch/f32] SmolLM2" in done.stdout  # each loaded its own
    result = json.loads(out.read_text())
    assert result["processes"] == "one per model"
    assert result["malloc"] == {"jax/f32": "glibc default", "torch/f32": "freed memory retained"}
    runs = result["phases"]["train"]["runs"]
    assert set(runs) == {"jax/f32", "torch/f32"}
    assert runs["jax/f32"]["last_loss"] == pytest.approx(runs["torch/f32"]["last_loss"], rel=1e-4)
    assert runs["jax/f32"]["last_loss"] < np.log(2)  # the second step, after one update of the zero head


def test_torch_malloc_needs_isolate(capsys):
    with pytest.raises(SystemExit):
        smollm2.parse_args(["--malloc=retain", "--torch_malloc=default"])
    assert "--torch_malloc=default needs --isolate=1" in capsys.readouterr().err
