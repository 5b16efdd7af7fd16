"""Generative finetuning, zero-shot scoring and greedy decoding on a tiny random LLaMA."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from w2s_jax import generate, train as T
from w2s_jax.data import batching
from w2s_jax.models import heads
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
RT = T.make_runtime({"fsdp": 1}, devices=jax.devices()[:1])


def lm_params(seed=0):
    return nn.meta.unbox(LlamaForCausalLM(CFG).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32)))["params"]


def test_generative_finetuning_lowers_the_lm_loss_on_the_task_texts():
    rng = np.random.default_rng(0)
    texts = [list(rng.integers(3, 13, 20)) for _ in range(64)]  # a narrow "task" distribution
    blocks = batching.lm_blocks(texts, seq_len=32, eos_id=2)
    lcfg = ml_collections.ConfigDict(dict(schedule="constant", optimizer="adamw", weight_decay=0.0))
    tx = T.make_optimizer(lcfg, 20, 3e-3)
    abstract, shard = T.state_shardings(CFG, None, tx, RT)
    state = T.create_state({"lm": lm_params()}, tx, shard)
    before = float(heads.lm_loss(CFG, state.params["lm"], blocks))
    step = T.jit_step(T.make_lm_step(CFG, tx), shard, RT)
    for s in range(20):
        state, _ = step(state, RT.put_batch({"blocks": blocks[(s * 8) % len(blocks):][:8]}))
    after = float(heads.lm_loss(CFG, state.params["lm"], blocks))
    assert after < before - 0.5  # from ~ln(40) = 3.7 towards ln(10) = 2.3


def test_zero_shot_picks_the_label_word_with_the_higher_likelihood():
    params = lm_params()
    prompt, words = [1, 5, 6, 7], [[20], [21, 22]]
    item = {"prompt": prompt, "cands": words, "length": len(prompt) + 3}
    scores = np.asarray(heads.candidate_logits(CFG, {"lm": params}, batching.collate([item], "choice_lm"),
                                               "choice_lm"))[0, :2]
    logp = jax.nn.log_softmax(LlamaForCausalLM(CFG).apply({"params": params}, jnp.asarray([prompt + [21, 22]])), -1)
    want = [float(jax.nn.log_softmax(LlamaForCausalLM(CFG).apply({"params": params}, jnp.asarray([prompt])), -1)
                  [0, -1, 20]), float(logp[0, 3, 21] + logp[0, 4, 22])]
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert int(np.argmax(scores)) == int(np.argmax(want))


class _Tok:
    eos_token_id = 2

    def decode(self, tokens):
        return "".join(f" m{t}" for t in tokens)


def test_batched_greedy_decoding_equals_one_prompt_at_a_time():
    params = lm_params(1)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]
    fn = generate.make_greedy_fn(CFG, RT, T.lm_param_shardings(CFG, RT), max_new_tokens=3)
    preds, texts = generate.greedy_predictions(fn, params, _Tok(), prompts, [[" m3"], [" m4"], [" m5"]], 4)
    model = LlamaForCausalLM(CFG)
    for prompt, text in zip(prompts, texts):
        seq = list(prompt)
        for _ in range(3):
            seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.asarray([seq]))[0, -1])))
        gen = seq[len(prompt):]
        if 2 in gen:
            gen = gen[:gen.index(2)]
        assert text == generate.first_word(_Tok().decode(gen))
    assert all(p in (-1, 0) for p in preds)
