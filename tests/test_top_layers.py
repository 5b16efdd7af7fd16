"""Finetuning the top layers alone on cached hidden states is finetuning the whole model with its lower layers
frozen: the same logits, the same loss and the same update."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from w2s_jax import losses, probe, top_layers
from w2s_jax import train as T
from w2s_jax.data import batching
from w2s_jax.models import heads
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)


def init(cfg):
    variables = jax.jit(LlamaForCausalLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return nn.meta.unbox(variables["params"])


def make_encoded(n, seed=0):
    """Classify encodings, prompts of 3 to 40 tokens (padded within a batch)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [1] + rng.integers(3, CFG.vocab_size, rng.integers(2, 40)).tolist()
        out.append({"src": i, "prompt": prompt, "cands": [[3], [4]], "length": len(prompt)})
    return out


def one_device():
    return T.make_runtime({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def top_inputs(cfg, lm, enc, k):
    """The encodings with the hidden states below the top k layers, extracted in padded batches."""
    states = probe.extract_prompt_states(cfg, lm, enc, cfg.num_hidden_layers - k, one_device(), batch_size=4)
    return top_layers.with_states(enc, probe.split_states(states, enc))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_top_layers_on_the_states_give_the_whole_models_logits(scan, k):
    cfg = CFG.replace(scan_layers=scan)
    lm = init(cfg)
    head = {"kernel": jax.random.normal(jax.random.key(1), (cfg.hidden_size, 2))}
    enc = make_encoded(9)
    top_cfg, top_lm = top_layers.keep_top_layers(cfg, lm, k)
    assert "embed_tokens" not in top_lm and top_cfg.num_hidden_layers == k
    whole = heads.candidate_logits(cfg, {"lm": lm, "head": head}, batching.collate(enc, "classify"), "classify")
    batch = batching.collate(top_inputs(cfg, lm, enc, k), "classify")
    assert batch["inputs_embeds"].shape == (9, 128, cfg.hidden_size)
    top = heads.candidate_logits(top_cfg, {"lm": top_lm, "head": head}, batch, "classify")
    np.testing.assert_allclose(np.asarray(top), np.asarray(whole), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_name", ["xent", "logconf"])
def test_a_train_step_on_the_top_layers_equals_the_whole_model_with_the_lower_layers_frozen(loss_name):
    k, n = 2, CFG.num_hidden_layers
    lm = init(CFG)
    head = {"kernel": jax.random.normal(jax.random.key(1), (CFG.hidden_size, 2)) * 0.1}
    enc = make_encoded(8, seed=3)
    targets = np.random.default_rng(2).dirichlet([1, 1], size=8).astype(np.float32)
    rt, loss = one_device(), losses.get(loss_name)

    def step(cfg, params, batch, tx, lm_keys=None):
        _, shard = T.state_shardings(cfg, params["head"], tx, rt, lm_keys)
        state = T.create_state(params, tx, shard)
        state = state.replace(step=state.step + 3)  # logconf's auxiliary term is on
        new, metrics = T.jit_step(T.make_choice_step(cfg, "classify", loss, tx, 10), shard, rt)(
            state, rt.put_batch(batch))
        return jax.device_get(new.params), float(metrics["loss"])

    # the whole model, its embedding and first n - k layers frozen; SGD with rate 1: the update is the gradient (Adam
    # would amplify rounding in tiny gradients)
    frozen = lambda name: name == "embed_tokens" or (name.startswith("layers_") and int(name[7:]) < n - k)
    labels = {"lm": {name: jax.tree.map(lambda _: "frozen" if frozen(name) else "train", p) for name, p in lm.items()},
              "head": {"kernel": "train"}}
    tx_whole = optax.multi_transform({"train": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    whole, whole_loss = step(CFG, {"lm": lm, "head": head}, batching.collate(enc, "classify", targets), tx_whole)
    top_cfg, top_lm = top_layers.keep_top_layers(CFG, lm, k)
    batch = batching.collate(top_inputs(CFG, lm, enc, k), "classify", targets)
    top, top_loss = step(top_cfg, {"lm": top_lm, "head": head}, batch, optax.sgd(1.0), set(top_lm))
    assert top_loss == pytest.approx(whole_loss, rel=1e-5)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    jax.tree.map(close, top["head"], whole["head"])
    jax.tree.map(close, top["lm"]["norm"], whole["lm"]["norm"])
    for i in range(k):
        jax.tree.map(close, top["lm"][f"layers_{i}"], whole["lm"][f"layers_{n - k + i}"])
    assert not np.allclose(top["head"]["kernel"], head["kernel"])  # it trained


def test_keep_top_layers_and_split_states_reject_what_does_not_fit():
    lm = init(CFG)
    with pytest.raises(ValueError, match=r"train.trainable_layers=3: the model has 3 layers; expected 1 \.\. 2"):
        top_layers.keep_top_layers(CFG, lm, 3)
    enc = make_encoded(3)
    with pytest.raises(ValueError, match="do not match 3 prompts.*stale cache"):
        probe.split_states(np.zeros((5, CFG.hidden_size), np.float32), enc)
