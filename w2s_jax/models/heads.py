"""Scoring heads: turn a LLaMA and a batch into candidate logits [B, K] (docs/CONTRACTS.md).

Parameters are `{"lm": llama_params, "head": {"kernel": [hidden, out]}}` (no head for `choice_lm`). The heads are
plain functions of the trunk's features, so the same LLaMA parameters serve every scoring.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM, project, project_grads

NEG_INF = -1e9


def head_outputs(scoring: str, num_classes: int) -> int:
    return {"classify": num_classes, "reward": 1, "choice_lm": 0}[scoring]


def init_head(scoring: str, num_classes: int, lm_params, cfg: LlamaConfig, init: str = "zero", label_token_ids=None,
              probe_kernel=None):
    """A linear head without bias: zero-initialised (the reference), from the unembedding rows of label tokens, or
    a probe fitted on the frozen model's features (`probe.fit_head_kernel`, given as `probe_kernel`)."""
    n = head_outputs(scoring, num_classes)
    if n == 0:
        return None
    if init == "zero":
        kernel = jnp.zeros((cfg.hidden_size, n), jnp.dtype(cfg.param_dtype))
    elif init == "unembed":
        if scoring != "classify" or label_token_ids is None or len(label_token_ids) != n:
            raise ValueError("train.head_init='unembed' needs classify scoring and one token per label word")
        kernel = jnp.asarray(unembedding(cfg, lm_params))[:, jnp.asarray(label_token_ids)]
    elif init == "probe":
        if scoring != "classify" or probe_kernel is None or probe_kernel.shape != (cfg.hidden_size, n):
            raise ValueError(f"train.head_init='probe' needs classify scoring and a probe kernel of shape "
                             f"{(cfg.hidden_size, n)}")
        kernel = jnp.asarray(probe_kernel, jnp.dtype(cfg.param_dtype))
    else:
        raise ValueError(f"train.head_init={init!r}: expected 'zero', 'unembed' or 'probe'")
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
        # `inputs_embeds`: a top-layers model's input, the states its frozen lower layers made (top_layers.py)
        feats = model.apply(lm, batch.get("input_ids"), batch["attention_mask"],
                            inputs_embeds=batch.get("inputs_embeds"), method=LlamaForCausalLM.features)
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


# The largest float32 logits block the LM loss holds at once. Its chunks' buffers are reused from one chunk to the
# next, where whole [tokens, vocab] logits and their gradient would be fresh memory on every step: a CPU pays for
# each fresh page with a page fault and the kernel zeroing it (docs/BENCHMARKS.md, change 14), an accelerator with
# memory the activations could use.
LOGITS_CHUNK_BYTES = 16 * 2 ** 20


def loss_chunks(tokens: int, vocab: int) -> int:
    """The number of token chunks `lm_head_cross_entropy` uses by default: the fewest (a power of two dividing
    `tokens`) whose float32 logits fit in LOGITS_CHUNK_BYTES."""
    chunks = 1
    while tokens * vocab * 4 > chunks * LOGITS_CHUNK_BYTES and tokens % (2 * chunks) == 0:
        chunks *= 2
    return chunks


def _chunked_cross_entropy(x, kernel, labels, chunks, with_grads):
    """sum_i CE(x_i @ kernel, labels_i) / N over `chunks` chunks of tokens, one after the other (a scan), and with
    `with_grads` the gradients of that mean for x and kernel too, while each chunk's logits are at hand."""
    n, hidden = x.shape
    chunks = loss_chunks(n, kernel.shape[-1]) if chunks is None else chunks
    if chunks < 1 or n % chunks:
        raise ValueError(f"lm_head_cross_entropy: chunks={chunks} must divide the number of tokens ({n})")
    # Chunk c holds tokens c, c + chunks, c + 2 * chunks, ...: strided, so a batch sharded over devices is split
    # over them the same way in every chunk.
    xs = x.reshape(n // chunks, chunks, hidden).swapaxes(0, 1)
    ys = labels.reshape(n // chunks, chunks).swapaxes(0, 1)

    def chunk_step(d_kernel, chunk):
        x_c, y_c = chunk
        logits = project(x_c, kernel, jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "act_vocab"))
        shift = jnp.max(logits, axis=-1, keepdims=True)
        exps = jnp.exp(logits - shift)
        total = jnp.sum(exps, axis=-1, keepdims=True)
        picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)
        loss = jnp.sum(shift + jnp.log(total) - picked)
        if not with_grads:
            return d_kernel, (loss, None)
        # (softmax - one_hot) / N from the exponentials already at hand, in x's dtype for the bfloat16 matmuls
        one_hot = jax.nn.one_hot(y_c, logits.shape[-1], dtype=jnp.float32)
        d_logits = (exps * (1.0 / (total * n)) - one_hot * (1.0 / n)).astype(x.dtype)
        d_x, d_kernel_c = project_grads(x_c, kernel, d_logits)
        return d_kernel + d_kernel_c.astype(jnp.float32), (loss, d_x)

    d_kernel = jnp.zeros(kernel.shape, jnp.float32) if with_grads else None  # the kernel's gradient, summed
    d_kernel, (losses, d_xs) = jax.lax.scan(chunk_step, d_kernel, (xs, ys))
    loss = jnp.sum(losses) / n
    if not with_grads:
        return loss
    return loss, (d_xs.swapaxes(0, 1).reshape(n, hidden), d_kernel.astype(kernel.dtype))


def _lm_head_ce_fwd(x, kernel, labels, chunks):
    return _chunked_cross_entropy(x, kernel, labels, chunks, with_grads=True)


def _lm_head_ce_bwd(chunks, grads, g):
    d_x, d_kernel = grads
    return (d_x * g).astype(d_x.dtype), (d_kernel * g).astype(d_kernel.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lm_head_cross_entropy(x, kernel, labels, chunks=None):
    """mean_i CE(x_i @ kernel, labels_i): the LM head and the next-token loss in one, for x: [N, hidden] in the
    compute dtype, kernel: [hidden, vocab] in the parameter dtype, labels: [N] ints.

    The same value as `optax.softmax_cross_entropy_with_integer_labels` on `project(x, kernel)`, computed over
    `chunks` chunks of tokens in turn (default `loss_chunks`), so no more than one chunk's [N / chunks, vocab]
    logits exist at a time. Under differentiation the forward pass also computes the gradients of x and kernel,
    chunk by chunk from the logits' exponentials, with the logits' gradient (softmax - one_hot) / N in x's dtype;
    the backward pass only scales them. Autodiff would instead keep all the float32 logits, exponentiate them again
    in the backward pass and write a float32 gradient that the bfloat16 backward matmuls then convert.
    """
    return _chunked_cross_entropy(x, kernel, labels, chunks, with_grads=False)


lm_head_cross_entropy.defvjp(_lm_head_ce_fwd, _lm_head_ce_bwd)


def lm_loss(cfg: LlamaConfig, lm_params, blocks):
    """Next-token cross-entropy on [B, L+1] token blocks (pretraining and generative finetuning)."""
    inputs, labels = blocks[:, :-1], blocks[:, 1:]
    feats = LlamaForCausalLM(cfg).apply({"params": lm_params}, inputs, method=LlamaForCausalLM.features)
    return lm_head_cross_entropy(feats.reshape(-1, feats.shape[-1]), unembedding(cfg, lm_params),
                                 labels.reshape(-1).astype(jnp.int32))
