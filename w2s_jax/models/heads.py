"""Scoring heads: turn a LLaMA and a batch into candidate logits [B, K] (docs/CONTRACTS.md).

Parameters are `{"lm": llama_params, "head": {"kernel": [hidden, out]}}` (no head for `choice_lm`). The heads are
plain functions of the trunk's features, so the same LLaMA parameters serve every scoring.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM, project, project_grads

NEG_INF = -1e9


def head_outputs(scoring: str, num_classes: int) -> int:
    return {"classify": num_classes, "reward": 1, "choice_lm": 0}[scoring]


def init_head(scoring: str, num_classes: int, lm_params, cfg: LlamaConfig, init: str = "zero", label_token_ids=None):
    """A linear head without bias: zero-initialised (the reference), or from the unembedding rows of label tokens."""
    n = head_outputs(scoring, num_classes)
    if n == 0:
        return None
    if init == "zero":
        kernel = jnp.zeros((cfg.hidden_size, n), jnp.dtype(cfg.param_dtype))
    elif init == "unembed":
        if scoring != "classify" or label_token_ids is None or len(label_token_ids) != n:
            raise ValueError("train.head_init='unembed' needs classify scoring and one token per label word")
        kernel = jnp.asarray(unembedding(cfg, lm_params))[:, jnp.asarray(label_token_ids)]
    else:
        raise ValueError(f"train.head_init={init!r}: expected 'zero' or 'unembed'")
    return {"kernel": kernel}


HEAD_LOGICAL_AXES = {"kernel": ("embed", None)}


def unembedding(cfg: LlamaConfig, lm_params):
    """The LM head's kernel [hidden, vocab] (the embedding's transpose when tied)."""
    return lm_params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else lm_params["lm_head"]["kernel"]


def _gather_last(x, last_index):
    """x: [N, L, H], last_index: [N] -> [N, H]."""
    return jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]


def candidate_logits(cfg: LlamaConfig, params, batch, scoring: str):
    """Logits [B, K] for a batch from `data.batching.collate`; invalid candidates are set to NEG_INF."""
    model = LlamaForCausalLM(cfg)
    lm = {"params": params["lm"]}
    if scoring == "classify":
        feats = model.apply(lm, batch["input_ids"], batch["attention_mask"], method=LlamaForCausalLM.features)
        h = _gather_last(feats, batch["last_index"])
        logits = h.astype(jnp.float32) @ params["head"]["kernel"].astype(jnp.float32)
    elif scoring == "reward":
        b, k, l = batch["input_ids"].shape
        feats = model.apply(lm, batch["input_ids"].reshape(b * k, l), batch["attention_mask"].reshape(b * k, l),
                            method=LlamaForCausalLM.features)
        h = _gather_last(feats, batch["last_index"].reshape(b * k))
        logits = (h.astype(jnp.float32) @ params["head"]["kernel"].astype(jnp.float32)).reshape(b, k)
    elif scoring == "choice_lm":
        logits = choice_logprobs(model, lm, batch)
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    return jnp.where(batch["cand_mask"], logits, NEG_INF)


def choice_logprobs(model: LlamaForCausalLM, lm_vars, batch):
    """Sum of log p(candidate tokens | prompt) for every candidate packed after the prompt -> [B, K]."""
    feats = model.apply(lm_vars, batch["input_ids"], batch["attention_mask"], batch["positions"],
                        batch["segment_ids"], method=LlamaForCausalLM.features)
    h = jnp.take_along_axis(feats, batch["score_src"][..., None], axis=1)  # [B, T, H]
    logp = jax.nn.log_softmax(model.apply(lm_vars, h, method=LlamaForCausalLM.logits_from_features), axis=-1)
    tok_logp = jnp.take_along_axis(logp, batch["score_tok"][..., None], axis=-1)[..., 0]  # [B, T]
    k = batch["cand_mask"].shape[1]
    onehot = jax.nn.one_hot(batch["score_cand"], k, dtype=jnp.float32)  # -1 (padding) -> all zeros
    return jnp.einsum("bt,btk->bk", tok_logp, onehot)


def _lm_head_ce_fwd(x, kernel, labels):
    logits = project(x, kernel, jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "act_vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    d_logits = (jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32))
    d_logits = (d_logits * (1.0 / x.shape[0])).astype(x.dtype)
    return jnp.mean(lse - picked), (x, kernel, d_logits)


def _lm_head_ce_bwd(residuals, g):
    x, kernel, d_logits = residuals
    dx, d_kernel = project_grads(x, kernel, d_logits)
    return (dx * g).astype(dx.dtype), (d_kernel * g).astype(d_kernel.dtype), None


@jax.custom_vjp
def lm_head_cross_entropy(x, kernel, labels):
    """mean_i CE(x_i @ kernel, labels_i): the LM head and the next-token loss in one, for x: [N, hidden] in the
    compute dtype, kernel: [hidden, vocab] in the parameter dtype, labels: [N] ints.

    The same value as `optax.softmax_cross_entropy_with_integer_labels` on `project(x, kernel)`, but the gradient
    of the logits, (softmax - one_hot) / N, is computed in the forward pass while the logits are at hand, and kept
    in x's dtype. Autodiff instead keeps the float32 logits, exponentiates them again in the backward pass and
    writes a float32 gradient that the bfloat16 backward matmuls then convert: two passes over [N, vocab] more.
    """
    return _lm_head_ce_fwd(x, kernel, labels)[0]


lm_head_cross_entropy.defvjp(_lm_head_ce_fwd, _lm_head_ce_bwd)


def lm_loss(cfg: LlamaConfig, lm_params, blocks):
    """Next-token cross-entropy on [B, L+1] token blocks (pretraining and generative finetuning)."""
    inputs, labels = blocks[:, :-1], blocks[:, 1:]
    feats = LlamaForCausalLM(cfg).apply({"params": lm_params}, inputs, method=LlamaForCausalLM.features)
    return lm_head_cross_entropy(feats.reshape(-1, feats.shape[-1]), unembedding(cfg, lm_params),
                                 labels.reshape(-1).astype(jnp.int32))
