"""A Flax Linen LLaMA (1/2/3) with logical-axis sharding annotations.

The parameter layout follows Hugging Face's `LlamaForCausalLM` (kernels are `weight.T`, q/k in the rotate_half
layout), so checkpoints convert without permutation (see `convert.py`). Every parameter and the main activations
carry logical axis names; `w2s_jax.parallel` maps them onto the ('data', 'fsdp', 'tensor') mesh.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2s_jax.models import onednn

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# "own": `dot_product_attention` below (the scores materialised, a hand-written backward; the fast one on CPU).
# "jax": `jax.nn.dot_product_attention`, which runs cuDNN's fused (flash) attention on NVIDIA GPUs where it applies.
ATTENTIONS = ("own", "jax")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    attention: str = "own"  # "own" | "jax" (ATTENTIONS)

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: expected one of {ROPE_TYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTIONS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    def replace(self, **kwargs) -> "LlamaConfig":
        return dataclasses.replace(self, **kwargs)

    @property
    def num_params(self) -> int:
        """Total parameter count (embeddings and LM head included)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * per_layer + self.vocab_size * h + head + h

    @property
    def num_non_embedding_params(self) -> int:
        """Parameters outside the embedding and LM head (the `N` of the 6N FLOPs-per-token rule)."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_params - self.vocab_size * self.hidden_size - head


def rope_inv_freq(cfg: LlamaConfig) -> jnp.ndarray:
    """Inverse RoPE frequencies, with linear or LLaMA-3.1 scaling applied as Hugging Face does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        old_len = cfg.rope_original_max_position
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_cos_sin(cfg: LlamaConfig, positions, length: int):
    """cos and sin of the rotary angles at `positions` ([B, L]; None: 0..L-1), [B or 1, L, head_dim] float32.

    They are looked up in a table over the positions [0, P), not computed as cos(positions * inv_freq) in place:
    XLA fuses an element-wise producer into each of its consumers, so the sin and cos would be recomputed in every
    layer's q and k rotation, forward and backward, 4 x layers times (on CPU, ~17% of a bench-4m train step). A
    gather is a fusion boundary for its table, so the table is computed once. P is L without explicit positions,
    else max(L, max_position_embeddings); positions outside [0, P) give NaN, never a silently wrong angle.
    """
    size = length if positions is None else max(length, cfg.max_position_embeddings)
    angles = jnp.arange(size, dtype=jnp.float32)[:, None] * rope_inv_freq(cfg)  # [P, D/2]
    if positions is None:
        positions = jnp.arange(length)[None]

    def look_up(table):
        half = jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)
        return jnp.concatenate([half, half], axis=-1)

    return look_up(jnp.cos(angles)), look_up(jnp.sin(angles))


def apply_rope(x, cos, sin):
    """x: [B, L, heads, D]; cos/sin: [B or 1, L, D] in float32."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotate_half(x.astype(jnp.float32)) * sin).astype(x.dtype)


def attention_allowed(attention_mask, segment_ids, length):
    """Which keys each query may see, [B or 1, 1, L, L] booleans: causal, no padded keys, and candidates only see
    the prompt and themselves.

    segment_ids (optional) packs several continuations after one prompt: segment 0 is the shared prompt, a token of
    segment s > 0 sees the prompt and the earlier tokens of segment s. Rows without a segment 0 pack independent
    sequences (`batching.collate_packed`).
    """
    idx = jnp.arange(length)
    allowed = (idx[None, :] <= idx[:, None])[None]  # [1, L, L]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].astype(bool)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & (same | (segment_ids[:, None, :] == 0))
    return allowed[:, None, :, :]


def attention_bias(attention_mask, segment_ids, length):
    """`attention_allowed` as an additive float32 bias [B or 1, 1, L, L]; fully masked rows (left padding) stay
    finite."""
    return jnp.where(attention_allowed(attention_mask, segment_ids, length), 0.0, jnp.finfo(jnp.float32).min)


def attention_mask_for(cfg: LlamaConfig, attention_mask, segment_ids, length):
    """What the layers' attention takes: the additive bias for the own attention; for jax's, the boolean mask, or
    None when only causality applies (so cuDNN can use its causal kernel, with no mask to read)."""
    if cfg.attention == "own":
        return attention_bias(attention_mask, segment_ids, length)
    if attention_mask is None and segment_ids is None:
        return None
    return attention_allowed(attention_mask, segment_ids, length)


def _is_16bit(x) -> bool:
    return jnp.dtype(x.dtype).itemsize <= 2


# The CPU-only layout pins below. `bench/memory.py` turns them off: it compiles on CPU to plan the memory of a GPU or
# TPU run, whose program has none (on a tensor-parallel mesh they would add ~0.7 GiB a device to a 7B plan).
CPU_LAYOUT_PINS = True


def _row_major(x):
    """x, materialised in row-major order when it is a bfloat16 (or other 16-bit) array on CPU; else x as is.

    XLA:CPU runs a bfloat16 x bfloat16 -> float32 matmul fast (AMX) only when its operands lie in memory as plain
    row-major arrays. Given a transposed view instead, XLA folds the transpose into the matmul or gives it a
    column-major layout, and then upcasts the matmul to float32: up to 6x slower. An optimization barrier on the
    flattened array pins the order (a 1-D array has one layout). In float32 the extra copy costs more than it saves
    on small models, and GPU and TPU compilers choose layouts well, so there the barrier is left out.
    """
    if not CPU_LAYOUT_PINS or jax.default_backend() != "cpu" or not _is_16bit(x):
        return x
    return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _transposed(x):
    """x with its last two axes swapped and materialised, so a matmul reads it as a plain array (see `_row_major`).
    In float32 a plain barrier is enough: it keeps XLA from folding the transpose into the matmul, which XLA:CPU
    then computes ~1.2-2x slower."""
    swapped = jnp.swapaxes(x, -1, -2)
    return _row_major(swapped) if _is_16bit(x) else jax.lax.optimization_barrier(swapped)


def _matmul(x, kernel, out_dtype):
    """x @ kernel in x's dtype, accumulated in float32, returned as `out_dtype` (through oneDNN where it is
    usable: `onednn.py`)."""
    if onednn.usable(x, out_dtype):
        return onednn.matmul(x, kernel.astype(x.dtype), out_dtype)
    return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def project(x, kernel, out_dtype):
    """`x @ kernel` for x: [tokens, in] in the compute dtype and kernel: [in, out] in the parameter dtype, computed
    in x's dtype, accumulated in float32 and returned as `out_dtype`. 16-bit inputs, and float32 ones that go to
    oneDNN, take `_project_vjp`, whose backward keeps the matmuls in x's dtype (and on oneDNN); otherwise float32
    is a plain matmul with JAX's own gradient."""
    if _is_16bit(x) or onednn.usable(x, out_dtype):
        return _project_vjp(x, kernel, out_dtype)
    return _matmul(x, kernel, out_dtype)


# `project` with a hand-written backward: the float32 cotangent is cast to x's dtype (so for 16-bit x the backward
# matmuls are bfloat16 x bfloat16 -> float32, not float32 ones), the kernel gradient is `x^T @ dy` with `x^T`
# materialised row-major (see `_row_major`) or read in place by oneDNN, and it is returned in the parameter dtype
# straight from the float32 accumulator, never rounded to bfloat16 on the way.
_project_vjp = jax.custom_vjp(_matmul, nondiff_argnums=(2,))


def _project_fwd(x, kernel, out_dtype):
    return _matmul(x, kernel, out_dtype), (x, kernel)


def project_grads(x, kernel, dy):
    """Gradients (d_x, d_kernel) of `project(x, kernel)` for the output cotangent dy: matmuls in x's dtype with
    float32 accumulation, `x^T` materialised (see `_transposed`), d_kernel in the parameter dtype."""
    dy = dy.astype(x.dtype)
    if onednn.usable(x, jnp.float32):  # oneDNN reads the transposed operands in place
        return (onednn.matmul(dy, kernel.astype(x.dtype), x.dtype, trans_b=True),
                onednn.matmul(x, dy, jnp.float32, trans_a=True).astype(kernel.dtype))
    dx = jax.lax.dot_general(dy, kernel.astype(x.dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    d_kernel = jnp.dot(_transposed(x), dy, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


def _project_bwd(out_dtype, residuals, dy):
    return project_grads(*residuals, dy)


_project_vjp.defvjp(_project_fwd, _project_bwd)


class Dense(nn.Module):
    """A bias-free projection `x @ kernel` over the last axis, computed as one 2-D matmul [tokens, in] @ [in, out].

    Same parameter (`kernel` [in, out]) and result as `nn.Dense`, but faster to train on CPU: with the batch and
    length axes flattened, XLA computes the kernel gradient from `dy` as is, where a [B, L, in] input makes it
    first copy `dy` into a transposed layout (for the LM head, a [vocab, B*L] copy per step); and `project`
    keeps the backward matmuls fast. `out_dtype` lets the LM head return float32 logits from bfloat16 inputs.
    """
    features: int
    names: tuple
    dtype: str
    param_dtype: str
    out_dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.names),
                            (x.shape[-1], self.features), self.param_dtype)
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = project(flat, kernel, jnp.dtype(self.out_dtype or self.dtype))
        return y.reshape(*x.shape[:-1], self.features)


def _dense(features, names, cfg, name, out_dtype=None):
    return Dense(features, names, cfg.dtype, cfg.param_dtype, out_dtype, name=name)


class RMSNorm(nn.Module):
    eps: float
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # The scale multiplies in float32: in a 16-bit product its gradient would be summed over every token in
        # bfloat16 (~10x the error, and a slow reduction on CPU).
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def _batched_matmul(a, b, out_dtype, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) over the last two axes, one matmul per index of the leading (batch) axes, accumulated in float32
    and returned as `out_dtype`; op transposes an operand when its flag is set (a stored [..., k, m], b stored
    [..., n, k]). oneDNN, where it is usable, reads a transposed operand in place; XLA computes op(a) @ b as
    (b^T a)^T with b^T and the result materialised (`_transposed`), so only small operands get transposed."""
    if onednn.usable(a, out_dtype):
        return onednn.matmul(a, b, out_dtype, trans_a, trans_b)
    if trans_a:
        return _transposed(_batched_matmul(b if trans_b else _transposed(b), a, out_dtype))
    batch = tuple(range(a.ndim - 2))
    dims = (((a.ndim - 1,), (b.ndim - 1 if trans_b else b.ndim - 2,)), (batch, batch))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out_dtype)


def _attention_fwd(q, k, v, bias):
    b, kv, gl, _ = q.shape
    l, s = bias.shape[-2:]
    scores = _batched_matmul(q, k, jnp.float32, trans_b=True)
    scores = scores.reshape(b, kv, gl // l, l, s) + bias[:, :, None]  # bias: [B, 1, L, S]
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kv, gl, s).astype(v.dtype)
    out = _batched_matmul(probs, v, v.dtype)
    return out, (q, k, v, probs, out, bias)


def _attention_bwd(residuals, d_out):
    """Hand-written backward. The two matmuls that contract over queries (d_v = probs^T d_out and
    d_k = d_scores^T q) read their first operand transposed (`_batched_matmul`); and the softmax backward uses
    rowsum(d_out * out), a [G*L, D] reduction, for rowsum(d_probs * probs)."""
    q, k, v, probs, out, bias = residuals
    d_out = _row_major(d_out)
    d_probs = _batched_matmul(d_out, v, jnp.float32, trans_b=True)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs.astype(jnp.float32) * (d_probs - row)).astype(q.dtype)
    d_q = _batched_matmul(d_scores, k, q.dtype)
    d_k = _batched_matmul(d_scores, q, k.dtype, trans_a=True)
    d_v = _batched_matmul(probs, d_out, v.dtype, trans_a=True)
    return d_q, d_k, d_v, jnp.zeros_like(bias)


@jax.custom_vjp
def dot_product_attention(q, k, v, bias):
    """softmax(q k^T + bias) v for q: [B, KV, G*L, D] already scaled by 1/sqrt(D) (the caller folds the scale into
    q's rotary tables), k/v: [B, KV, S, D], bias: [B, 1, L, S].

    The G query heads that share a kv head are stacked along the query axis, so grouped-query attention needs
    no repeated k/v and every matmul is a plain batched [B, KV] matmul.
    """
    return _attention_fwd(q, k, v, bias)[0]


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        """mask: `attention_mask_for`'s."""
        cfg = self.cfg
        b, l, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(h * d, ("embed", "heads"), cfg, "q_proj")(x).reshape(b, l, h, d)
        k = _dense(kv * d, ("embed", "kv_heads"), cfg, "k_proj")(x).reshape(b, l, kv, d)
        v = _dense(kv * d, ("embed", "kv_heads"), cfg, "v_proj")(x).reshape(b, l, kv, d)
        # The softmax scale 1/sqrt(D) rides on q's rotation (tables [L, D], not [B, L, H, D] multiplies), in float32.
        q = apply_rope(q, cos / math.sqrt(d), sin / math.sqrt(d))
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
        v = nn.with_logical_constraint(v, ("batch", "length", "act_kv_heads", None))
        if cfg.attention == "jax":  # query head n reads kv head n // G, as here; q is already scaled
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, is_causal=mask is None)
            out = out.reshape(b, l, h * d)
        else:  # heads-major layout: q [B, KV, G*L, D] (query heads grouped per kv head), k/v [B, KV, L, D]
            q = _row_major(q.reshape(b, l, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, h // kv * l, d))
            k, v = _row_major(k.transpose(0, 2, 1, 3)), _row_major(v.transpose(0, 2, 1, 3))
            out = dot_product_attention(q, k, v, mask)
            out = _row_major(out.reshape(b, kv, h // kv, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, h * d))
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads"))
        return _dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj")(out)


def _swiglu_fwd(gate, up):
    # In float32: XLA:CPU would round every step of a 16-bit silu to bfloat16 (slower, and less accurate).
    act = nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
    return act.astype(gate.dtype), (gate, up)


def _swiglu_bwd(residuals, d_act):
    gate, up = residuals
    g, u, d_act = gate.astype(jnp.float32), up.astype(jnp.float32), d_act.astype(jnp.float32)
    # sigmoid(g) as 0.5 tanh(g / 2) + 0.5, not as the forward's 1 / (1 + exp(-g)): XLA would merge the two
    # identical expressions and keep the forward's float32 sigmoid (and silu) alive until the backward pass.
    sig = 0.5 * jnp.tanh(0.5 * g) + 0.5
    d_gate = d_act * u * (sig * (1.0 + g * (1.0 - sig)))
    d_up = d_act * (g * sig)
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, computed in float32 and returned in gate's dtype. Its backward pass keeps only gate and up
    (in the compute dtype) and recomputes the sigmoid from them. With autodiff, XLA keeps the forward pass's
    float32 sigmoid and silu ([tokens, intermediate] each) for the backward pass, and XLA:CPU writes them out in
    three passes where the product alone takes one."""
    return _swiglu_fwd(gate, up)[0]


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj")(x)
        act = swiglu(gate, up)
        act = nn.with_logical_constraint(act, ("batch", "length", "act_mlp"))
        return _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(act)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block. Returns (h, h) so it can be scanned with per-layer outputs."""
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        x = x + Attention(cfg, name="self_attn")(norm("input_layernorm")(x), mask, cos, sin)
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, x


def _remat(layer_cls, cfg: LlamaConfig):
    if cfg.remat_policy == "none":
        return layer_cls
    policy = {"full": None,
              "dots": jax.checkpoint_policies.checkpoint_dots,
              "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[cfg.remat_policy]
    return nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)


class LlamaForCausalLM(nn.Module):
    """LLaMA decoder with an LM head.

    `__call__` returns logits [B, L, vocab] in float32, plus the hidden states of every layer when asked
    (`(embeddings, layer_1, ..., layer_{N-1}, norm(layer_N))`, Hugging Face's convention).
    `features` returns only the final normed hidden states, for heads that do not need the vocabulary projection.
    """
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        layer = _remat(DecoderLayer, cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head", out_dtype="float32")

    def _trunk(self, input_ids, attention_mask, positions, segment_ids, keep_all, inputs_embeds=None):
        cfg = self.config
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids.astype(jnp.int32))
        else:  # the hidden states some earlier layers made (`top_layers.py`): the embedding is not read
            x = inputs_embeds.astype(cfg.dtype)
        l = x.shape[1]
        cos, sin = rope_cos_sin(cfg, positions, l)
        mask = attention_mask_for(cfg, attention_mask, segment_ids, l)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        hidden = [x]
        if cfg.scan_layers:
            x, per_layer = self.layers(x, mask, cos, sin)  # per_layer: [layers, B, L, hidden]
            if keep_all:
                hidden += [per_layer[i] for i in range(cfg.num_hidden_layers - 1)]
        else:
            for layer in self.layers:
                x, _ = layer(x, mask, cos, sin)
                hidden.append(x)
            hidden = hidden[:-1]
        x = self.norm(x)
        return x, (tuple(hidden) + (x,) if keep_all else None)

    def features(self, input_ids, attention_mask=None, positions=None, segment_ids=None, inputs_embeds=None):
        """Final normed hidden states [B, L, hidden] (no LM head). With `inputs_embeds` [B, L, hidden] the layers
        start from those states instead of the token embeddings (`input_ids` may then be None)."""
        return self._trunk(input_ids, attention_mask, positions, segment_ids, False, inputs_embeds)[0]

    def logits_from_features(self, x):
        if self.config.tie_word_embeddings:  # 2-D matmul, as in `Dense`
            logits = self.embed_tokens.attend(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        else:
            logits = self.lm_head(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 output_hidden_states: bool = False):
        x, all_hidden = self._trunk(input_ids, attention_mask, positions, segment_ids, output_hidden_states)
        logits = self.logits_from_features(x)
        if output_hidden_states:
            return logits, all_hidden
        return logits
