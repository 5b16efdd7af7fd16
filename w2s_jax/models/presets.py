"""Named model sizes: the real LLaMA architectures, a tiny CPU ladder and two throughput-benchmark sizes.

The real presets match the published Hugging Face configs, so `get_preset("llama2-7b")` describes the same model
that `convert.load_hf` reads from a `meta-llama/Llama-2-7b-hf` checkpoint. The tiny ladder's vocabulary is set by
the tokenizer built at run time: pass `vocab_size=` to `get_preset`.
"""
from __future__ import annotations

import dataclasses

from w2s_jax.models.llama import LlamaConfig

_LLAMA1_7B = LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
    rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA1_13B = dataclasses.replace(
    _LLAMA1_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
    num_key_value_heads=40)
# LLaMA-2 changes only the norm epsilon and the context length.
_LLAMA2_7B = dataclasses.replace(_LLAMA1_7B, rms_norm_eps=1e-5, max_position_embeddings=4096)
_LLAMA2_13B = dataclasses.replace(_LLAMA1_13B, rms_norm_eps=1e-5, max_position_embeddings=4096)
# LLaMA-3 has no pad token; padding uses <|end_of_text|> (models never read a pad id, only lengths).
_LLAMA3_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
    rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001,
    pad_token_id=128001)
_LLAMA31_8B = dataclasses.replace(
    _LLAMA3_8B, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_max_position=8192, max_position_embeddings=131072)
# LLaMA-3.2-1B: 16 layers of width 2048, tied embeddings, the LLaMA-3.1 rope at factor 32 (the ~1B of bench/mfu.py).
_LLAMA32_1B = dataclasses.replace(
    _LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_key_value_heads=8,
    head_dim=64, rope_factor=32.0, tie_word_embeddings=True)


def _tiny(hidden: int, layers: int, heads: int, vocab_size: int = 512, max_len: int = 1024) -> LlamaConfig:
    """A small LLaMA for CPU runs: MLP width 4x hidden, multi-head attention, LLaMA-2 style norms."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=max_len)


PRESETS: dict[str, LlamaConfig] = {
    "llama1-7b": _LLAMA1_7B,
    "llama1-13b": _LLAMA1_13B,
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": _LLAMA2_13B,
    "llama3-8b": _LLAMA3_8B,
    "llama3.1-8b": _LLAMA31_8B,
    "llama3.2-1b": _LLAMA32_1B,
    # Tiny ladder for the CPU default (non-embedding params ~0.07M, ~0.26M, ~0.59M; sized so that the whole chess
    # experiment runs in minutes on 2 cores); vocab_size comes from the tokenizer.
    "tiny-s": _tiny(hidden=48, layers=2, heads=2),
    "tiny-m": _tiny(hidden=64, layers=4, heads=2),
    "tiny-l": _tiny(hidden=96, layers=4, heads=2),
    # Micro ladder for smoke tests and CI (seconds per stage).
    "micro-s": _tiny(hidden=32, layers=2, heads=2),
    "micro-m": _tiny(hidden=48, layers=2, heads=2),
    "micro-l": _tiny(hidden=64, layers=3, heads=4),
    # Throughput benchmark sizes, sequence length 256 (totals ~4.2M and ~26.9M parameters).
    "bench-4m": _tiny(hidden=128, layers=8, heads=4, vocab_size=8192, max_len=256),
    "bench-27m": _tiny(hidden=256, layers=10, heads=8, vocab_size=32000, max_len=256),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
    """The named config with `overrides` applied (e.g. `vocab_size=`, `dtype="bfloat16"`, `scan_layers=True`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown LlamaConfig fields {unknown}")
    return dataclasses.replace(PRESETS[name], **overrides)
