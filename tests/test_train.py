"""Training engine: scoring heads, full-batch losses under microbatching, learning, sharding, kill-and-resume."""
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from w2s_jax import losses
from w2s_jax import train as T
from w2s_jax.data import batching
from w2s_jax.metric_writer import MetricWriter, read_metrics
from w2s_jax.models import heads
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

WORDS = [f"w{i}" for i in range(20)]
CFG = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
TCFG = ml_collections.ConfigDict(dict(schedule="cosine", optimizer="adam", warmup_steps=0))


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def make_examples(n, scoring, seed=0):
    """A learnable toy task: the label says whether the first word is one of w0..w9."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ws = rng.integers(0, 20, rng.integers(3, 9))
        cands = ["0", "1"] if scoring == "classify" else [" w1 w2", " w3"] if scoring == "choice_lm" else [" w1", " w2"]
        out.append({"id": str(i), "prompt": " ".join(WORDS[w] for w in ws), "candidates": cands,
                    "label": int(ws[0] < 10)})
    return out


def init_params(scoring, seed=0):
    lm = nn.meta.unbox(LlamaForCausalLM(CFG).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32)))["params"]
    head = heads.init_head(scoring, 2, lm, CFG)
    if head is not None:  # a non-zero head so that gradients reach the trunk from the first step
        head = {"kernel": jax.random.normal(jax.random.PRNGKey(seed + 1), head["kernel"].shape) * 0.1}
    return ({"lm": lm} if head is None else {"lm": lm, "head": head}), head


def one_hot(exs, k):
    return np.eye(k, dtype=np.float32)[[e["label"] for e in exs]]


@pytest.mark.parametrize("scoring", ["choice_lm", "reward", "classify"])
def test_candidate_logits_match_separate_forward_passes(tokenizer, scoring):
    """Packed candidates (choice_lm) and per-candidate sequences (reward) equal running each sequence alone."""
    exs = make_examples(3, scoring)
    enc, _ = batching.encode_examples(exs, tokenizer, scoring, 64)
    params, _ = init_params(scoring)
    logits = np.asarray(heads.candidate_logits(CFG, params, batching.collate(enc, scoring), scoring))
    model = LlamaForCausalLM(CFG)
    for r, it in enumerate(enc):
        for c, cand in enumerate(it["cands"]):
            seq = jnp.asarray([it["prompt"] + cand])
            if scoring == "choice_lm":
                logp = jax.nn.log_softmax(model.apply({"params": params["lm"]}, seq)[0], -1)
                p = len(it["prompt"])
                want = sum(float(logp[p - 1 + q, t]) for q, t in enumerate(cand))
            elif scoring == "reward":
                h = model.apply({"params": params["lm"]}, seq, method=LlamaForCausalLM.features)[0, -1]
                want = float(h @ params["head"]["kernel"][:, 0])
            else:
                h = model.apply({"params": params["lm"]}, jnp.asarray([it["prompt"]]),
                                method=LlamaForCausalLM.features)[0, -1]
                want = float((h @ params["head"]["kernel"])[c])
            np.testing.assert_allclose(logits[r, c], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_name,n_real", [("xent", 32), ("logconf", 32), ("product", 32), ("xent", 26),
                                              ("logconf", 26)])
def test_microbatches_equal_full_batch(tokenizer, loss_name, n_real):
    """The loss sees the full batch even when memory forces microbatches: the update is the same, also for a
    ragged batch (26 real rows of 32: the last microbatch holds 2 real rows and 6 of padding)."""
    scoring = "classify"
    exs = make_examples(n_real, scoring)
    enc, _ = batching.encode_examples(exs, tokenizer, scoring, 64)
    targets = np.random.default_rng(1).dirichlet([1, 1], size=n_real).astype(np.float32)  # soft weak labels
    batch = batching.collate(enc, scoring, targets, batch_size=32)
    rt = T.make_runtime({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    params, head = init_params(scoring)
    tx = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify rounding in tiny gradients)
    abstract, shard = T.state_shardings(CFG, head, tx, rt)
    loss = losses.get(loss_name)
    out = {}
    for micro in (1, 4):
        state = T.create_state(params, tx, shard)
        state = state.replace(step=state.step + 3)  # step_frac > 0 so logconf's aux term is active
        step = T.jit_step(T.make_choice_step(CFG, scoring, loss, tx, 10, micro), shard, rt)
        new_state, m = step(state, rt.put_batch(batch))
        out[micro] = (jax.device_get(new_state.params), float(m["loss"]), float(m["train_accuracy"]))
    assert out[1][1] == pytest.approx(out[4][1], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out[1][0], out[4][0])
    logits = np.asarray(heads.candidate_logits(CFG, params, batch, scoring))[:n_real]
    want_acc = np.mean(logits.argmax(-1) == targets.argmax(-1))  # the real rows only
    assert out[1][2] == out[4][2] == pytest.approx(want_acc)
    if loss_name == "xent":  # by hand: the mean over the real rows of -sum_k t_k log softmax(logits)_k
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        assert out[4][1] == pytest.approx(float(np.mean(-(targets * logp).sum(-1))), rel=1e-5)


def ragged_linear_batch(seed=0):
    """8 rows of a linear scorer, 5 real (row 1 with 2 of its 3 candidates) then 3 rows of padding."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 4)).astype(np.float32)  # padding rows have inputs too: they must not count
    mask = np.zeros((8, 3), bool)
    mask[:5] = True
    mask[1, 2] = False
    targets = np.where(mask, rng.dirichlet([1, 1, 1], size=8), 0.0)
    targets = (targets / np.maximum(targets.sum(-1, keepdims=True), 1e-9)).astype(np.float32)
    return {"x": x, "cand_mask": mask, "targets": targets}, {"w": rng.normal(size=(4, 3)).astype(np.float32)}


def linear_score(params, batch):
    return jnp.where(batch["cand_mask"], batch["x"] @ params["w"], losses.MASKED_LOGIT)


@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_microbatched_loss_of_a_ragged_batch_matches_hand_values(microbatches):
    """Padding rows weigh 0 in the microbatched sums too: with 2 rows a microbatch, the third one is half padding
    and the last all padding, and loss and gradient still equal the mean over the 5 real rows."""
    batch, params = ragged_linear_batch()
    value, grads, _ = jax.jit(lambda p: T.choice_loss_and_grads(linear_score, p, batch, losses.get("xent"), 0.0,
                                                                microbatches))(params)
    real, mask, t = slice(0, 5), batch["cand_mask"][:5], batch["targets"][:5]
    z = np.where(mask, batch["x"][real] @ params["w"], -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ce = -(t * np.log(np.where(mask, p, 1.0))).sum(-1)
    assert float(value) == pytest.approx(ce.mean(), rel=1e-5)
    # d CE_i / d logits_i = p_i - t_i (each row's targets sum to 1), so dW = X^T (P - T) / 5
    np.testing.assert_allclose(grads["w"], batch["x"][real].T @ (p - t) / 5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["logconf", "window", "product"])
def test_microbatches_equal_full_batch_on_a_ragged_batch_for_every_loss(loss_name):
    batch, params = ragged_linear_batch(seed=1)
    out = {m: jax.jit(lambda p: T.choice_loss_and_grads(linear_score, p, batch, losses.get(loss_name), 0.5, m)[:2])(
        params) for m in (1, 4)}
    assert float(out[1][0]) == pytest.approx(float(out[4][0]), rel=1e-5)
    np.testing.assert_allclose(out[1][1]["w"], out[4][1]["w"], rtol=1e-5, atol=1e-7)


def _train(tokenizer, scoring, workdir, mesh_cfg, devices, steps=None, stop_at=None, seed=0, epochs=4):
    exs = make_examples(256, scoring, seed)
    enc, _ = batching.encode_examples(exs, tokenizer, scoring, 64)
    k, l, t = batching.max_shapes(enc, scoring)
    order = batching.epoch_order(len(enc), 32, seed, epochs=epochs)
    steps = steps or len(order)
    rt = T.make_runtime(mesh_cfg, devices=devices)
    params, head = init_params(scoring, seed)
    tx = T.make_optimizer(TCFG, steps, 3e-3)
    abstract, shard = T.state_shardings(CFG, head, tx, rt)
    state = T.create_state(params, tx, shard)
    step = T.jit_step(T.make_choice_step(CFG, scoring, losses.get("xent"), tx, steps), shard, rt)

    def get_batch(s):
        if stop_at is not None and s == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # what a TPU preemption sends; handled between steps
        rows = [enc[i] for i in order[s]]
        return batching.collate(rows, scoring, one_hot([exs[i] for i in order[s]], k), 32, k, l, t)

    with MetricWriter(os.path.join(workdir, "logs")) as writer:
        state, _ = T.run_loop(state=state, abstract_state=abstract, shardings=shard, step_fn=step,
                              get_batch=get_batch, num_steps=steps, ckpt_dir=os.path.join(workdir, "ckpt"),
                              runtime=rt, checkpoint_every=5, writer=writer)
    predict = T.make_predict_fn(CFG, scoring, rt, shard.params)
    logits = predict(state.params, batching.collate(enc[:128], scoring, batch_size=128))
    acc = float(np.mean(logits.argmax(-1) == np.array([e["label"] for e in exs[:128]])))
    return jax.device_get(state.params), acc


def test_tiny_model_learns_tiny_task(tokenizer, tmp_path):
    _, acc = _train(tokenizer, "classify", str(tmp_path), {"fsdp": 1}, jax.devices()[:1], epochs=10)
    assert acc > 0.85  # chance is ~0.5; the rule is a function of one token


def test_sigterm_then_resume_equals_uninterrupted(tokenizer, tmp_path):
    ref, _ = _train(tokenizer, "classify", str(tmp_path / "ref"), {"fsdp": 1}, jax.devices()[:1], steps=12)
    with pytest.raises(T.Preempted, match="SIGTERM"):
        _train(tokenizer, "classify", str(tmp_path / "run"), {"fsdp": 1}, jax.devices()[:1], steps=12, stop_at=7)
    resumed, _ = _train(tokenizer, "classify", str(tmp_path / "run"), {"fsdp": 1}, jax.devices()[:1], steps=12)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref, resumed)
    assert read_metrics(tmp_path / "ref" / "logs") == read_metrics(tmp_path / "run" / "logs")


def test_sharded_training_equals_single_device(tokenizer, tmp_path):
    """fsdp=4 x tensor=2 on 8 virtual devices trains to the same parameters as one device."""
    one, _ = _train(tokenizer, "classify", str(tmp_path / "one"), {"fsdp": 1}, jax.devices()[:1], steps=6)
    eight, _ = _train(tokenizer, "classify", str(tmp_path / "eight"), {"data": 1, "fsdp": 4, "tensor": 2},
                      jax.devices()[:8], steps=6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), one, eight)


def test_partial_checkpoint_falls_back_to_previous_step(tokenizer, tmp_path):
    ref, _ = _train(tokenizer, "classify", str(tmp_path / "ref"), {"fsdp": 1}, jax.devices()[:1], steps=12)
    with pytest.raises(T.Preempted):
        _train(tokenizer, "classify", str(tmp_path / "run"), {"fsdp": 1}, jax.devices()[:1], steps=12, stop_at=7)
    # A kill during a save leaves a step directory without its contents: it must be skipped, not trusted.
    latest = tmp_path / "run" / "ckpt" / "latest"
    steps = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    broken = latest / str(steps[-1])
    for f in broken.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    resumed, _ = _train(tokenizer, "classify", str(tmp_path / "run"), {"fsdp": 1}, jax.devices()[:1], steps=12)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ref, resumed)


def test_early_stopping_restores_the_best_evaluation(tokenizer, tmp_path):
    """The parameters at the end are those of the best validation score, not the last step's."""
    scoring = "classify"
    exs = make_examples(64, scoring)
    enc, _ = batching.encode_examples(exs, tokenizer, scoring, 64)
    k, l, t = batching.max_shapes(enc, scoring)
    rt = T.make_runtime({"fsdp": 1}, devices=jax.devices()[:1])
    params, head = init_params(scoring)
    tx = T.make_optimizer(TCFG, 8, 1e-2)
    abstract, shard = T.state_shardings(CFG, head, tx, rt)
    step = T.jit_step(T.make_choice_step(CFG, scoring, losses.get("xent"), tx, 8), shard, rt)
    order = batching.epoch_order(64, 32, 0, steps=8)
    batch = lambda s: batching.collate([enc[i] for i in order[s]], scoring,
                                       one_hot([exs[i] for i in order[s]], k), 32, k, l, t)
    seen = {}
    scores = {0: 0.1, 2: 0.3, 4: 0.9, 6: 0.5, 8: 0.2}  # the best evaluation is at step 4

    def eval_fn(state):
        s = int(jax.device_get(state.step))
        seen[s] = jax.device_get(state.params)
        return scores[s]

    state, loop = T.run_loop(state=T.create_state(params, tx, shard), abstract_state=abstract, shardings=shard,
                             step_fn=step, get_batch=batch, num_steps=8, ckpt_dir=str(tmp_path), runtime=rt,
                             eval_fn=eval_fn, eval_every=2)
    assert loop["best_step"] == 4 and [e[0] for e in loop["evals"]] == [0, 2, 4, 6, 8]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), seen[4])


def test_head_initialised_from_the_unembedding_rows_of_the_label_tokens():
    params, _ = init_params("choice_lm")
    head = heads.init_head("classify", 2, params["lm"], CFG, init="unembed", label_token_ids=[5, 7])
    np.testing.assert_array_equal(head["kernel"], np.asarray(params["lm"]["lm_head"]["kernel"])[:, [5, 7]])
    assert not np.any(heads.init_head("classify", 2, params["lm"], CFG)["kernel"])  # the reference's zero init


def test_checkpoint_restores_onto_another_mesh(tokenizer, tmp_path):
    """Saved on 8 devices (fsdp=8), restored on 4 (fsdp=2 x tensor=2): same values, the new layout."""
    params, head = init_params("classify")
    tx = T.make_optimizer(TCFG, 10, 1e-3)
    rt8 = T.make_runtime({"data": 1, "fsdp": 8, "tensor": 1})
    _, shard8 = T.state_shardings(CFG, head, tx, rt8)
    state = T.create_state(params, tx, shard8)
    T._save(T.checkpoint_manager(str(tmp_path)), 3, state, {"step": 3})
    rt4 = T.make_runtime({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    abstract4, shard4 = T.state_shardings(CFG, head, tx, rt4)
    restored, loop = T.restore_latest(T.checkpoint_manager(str(tmp_path)), abstract4, shard4)
    assert loop["step"] == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    q = restored.params["lm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 4 and q.addressable_shards[0].data.shape == (16, 16)


def test_config_batches_and_the_default_mesh_of_the_llama2_preset():
    """Every batch of a run reaches the mesh: llama2's train microbatches of 8 rows on 64 devices give 1 x 8 x 8;
    on the 8 test devices, an eval batch of 4 moves half of them to tensor."""
    from configs import chess
    cfg = chess.get_config("llama2")
    batches = T.config_batches(cfg)
    assert [b.describe() for b in batches] == ["train.batch_size=32 / train.microbatches=4 = 8 rows",
                                               "eval.batch_size=32"]
    from w2s_jax import parallel
    assert parallel.mesh_shape(cfg.mesh.to_dict(), 64, batches) == (1, 8, 8)
    cfg.eval.batch_size = 4
    rt = T.make_runtime(cfg.mesh.to_dict(), batches=T.config_batches(cfg))
    assert dict(rt.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    smoke = chess.get_config("smoke")  # pretrained ladder models; "genft" adds generative finetuning's batches
    smoke.experiment.methods = "probe,genft"
    assert [b.size_key for b in T.config_batches(smoke)] == ["train.batch_size", "eval.batch_size",
                                                              "pretrain.batch_size", "genft.batch_size"]
