"""Greedy decoding of short continuations (a chess move), batched and jitted, for generative evaluation.

Prompts are left-padded into a fixed buffer with room for `max_new_tokens`; each step runs the frozen model over
the buffer and appends the argmax token. No KV cache: continuations here are a few tokens long, so the simple
fixed-shape loop compiles once and costs `max_new_tokens` forward passes per batch.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.data.batching import bucket
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM
from w2s_jax.train import to_host


def make_greedy_fn(cfg: LlamaConfig, runtime, param_shardings, max_new_tokens: int):
    """Jitted decoder: (params, ids [B, L], mask [B, L]) -> new tokens [B, max_new_tokens]."""
    model = LlamaForCausalLM(cfg)

    def decode(params, ids, mask):
        b, l = ids.shape
        ids = jnp.concatenate([ids, jnp.zeros((b, max_new_tokens), ids.dtype)], axis=1)
        mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), mask.dtype)], axis=1)

        def step(carry, t):
            ids, mask = carry
            pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            feats = model.apply({"params": params}, ids, mask, pos, method=LlamaForCausalLM.features)
            last = jax.lax.dynamic_slice_in_dim(feats, l + t - 1, 1, axis=1)
            logits = model.apply({"params": params}, last, method=LlamaForCausalLM.logits_from_features)
            tok = jnp.argmax(logits[:, 0], axis=-1).astype(ids.dtype)
            ids = jax.lax.dynamic_update_slice_in_dim(ids, tok[:, None], l + t, axis=1)
            mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((b, 1), mask.dtype), l + t, axis=1)
            return (ids, mask), tok

        _, toks = jax.lax.scan(step, (ids, mask), jnp.arange(max_new_tokens))
        return toks.T

    jitted = jax.jit(decode, in_shardings=(param_shardings, runtime.batch_sharding, runtime.batch_sharding),
                     out_shardings=runtime.replicated)

    def run(params, ids, mask):
        with runtime.tracing():
            return to_host(jitted(params, *runtime.put_batch((ids, mask))))
    return run


def first_word(text: str) -> str:
    """The first whitespace-delimited word: a move in SAN (the continuation starts with a space)."""
    words = text.split()
    return words[0] if words else ""


def greedy_predictions(greedy_fn, params, tokenizer, prompts: Sequence[Sequence[int]],
                       candidates: Sequence[Sequence[str]], batch_size: int) -> tuple[list[int], list[str]]:
    """(index of the generated move among the candidates, or -1 when it is none of them; the generated text)."""
    preds, texts = [0] * len(prompts), [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        l = bucket(max(len(prompts[i]) for i in idx))
        ids = np.zeros((batch_size, l), np.int32)
        mask = np.zeros((batch_size, l), np.int32)
        for r, i in enumerate(idx):  # left padding: every prompt ends at the same column
            ids[r, l - len(prompts[i]):] = prompts[i]
            mask[r, l - len(prompts[i]):] = 1
        new = greedy_fn(params, ids, mask)
        for r, i in enumerate(idx):
            tokens = [int(t) for t in new[r]]
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
            move = first_word(tokenizer.decode(tokens))
            texts[i] = move
            stripped = [c.strip() for c in candidates[i]]
            preds[i] = stripped.index(move) if move in stripped else -1
    return preds, texts
