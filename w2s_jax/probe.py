"""Linear probes on frozen features: the paper's cheapest weak-to-strong method.

Features are the hidden state of one layer at the last real token of each example's prompt (`pooling='last'`), or
its mean over the prompt's tokens (`'mean'`), computed once with a jitted, sharded forward pass of the frozen LLaMA
(`extract_features`) and cached on disk (`cached_features`).
A multinomial logistic regression (`train_logreg`) is then fitted on soft targets (weak labels or one-hot ground
truth), optionally early-stopped on a validation set.

A probe with `standardize=False, bias=False` on the final layer is exactly the classification head of
`models/heads.py` with a frozen trunk; `as_linear_head` folds any probe into that form (a kernel plus a bias).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from w2s_jax import parallel
from w2s_jax.data import batching
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM
from w2s_jax.train import to_host


class ProbeParams(struct.PyTreeNode):
    """logits = ((features - mean) / std) @ weight + bias."""
    weight: jax.Array  # [H, K]
    bias: jax.Array  # [K]
    mean: jax.Array  # [H] train-feature mean (zeros without standardisation)
    std: jax.Array  # [H] train-feature std (ones without standardisation)


# ------------------------------------------------------------------------------------------------ features
def _batch_devices(runtime) -> int:
    """How many ways the runtime splits the batch dimension."""
    axes = runtime.batch_sharding.spec[0] if len(runtime.batch_sharding.spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(runtime.mesh.shape[a] for a in axes)


def _check_layer(cfg: LlamaConfig, layer: int) -> int:
    """The layer as a non-negative index into (embeddings, layer_1, ..., norm(layer_N))."""
    n = cfg.num_hidden_layers + 1
    if not -n <= layer < n:
        raise ValueError(f"layer={layer}: the model has {n} hidden states (embeddings + {n - 1} layers); "
                         f"valid layers are {-n} .. {n - 1}")
    return layer % n


def _hidden_states(cfg: LlamaConfig, lm_params, batch):
    """Every hidden state (embeddings, layer_1, ..., norm(layer_N)), each [B, L, H], of a (packed) batch. Under jit,
    the LM head and the layers after those a caller reads are dead code and are not computed."""
    _, hidden = LlamaForCausalLM(cfg).apply({"params": lm_params}, batch["input_ids"], batch["attention_mask"],
                                            batch.get("positions"), batch.get("segment_ids"),
                                            output_hidden_states=True)
    return hidden


POOLINGS = ("last", "mean")


def check_pooling(pooling: str, what: str = "pooling") -> str:
    """`pooling` if it is one of POOLINGS, else a ValueError that names it as `what` (the config key)."""
    if pooling not in POOLINGS:
        raise ValueError(f"{what}={pooling!r}: expected one of {list(POOLINGS)}")
    return pooling


def prompt_features_fn(cfg: LlamaConfig, layers: Sequence[int], pooling: str = "last"):
    """(lm_params, batch) -> float32 [len(layers), B, S, H]: for each hidden state in `layers`, each packed prompt's
    state at its last token (`batch["last_index"]` [B, S], `batching.collate_packed`) or its mean over the prompt's
    tokens (the positions whose `segment_ids` name it).

    Why a mean: a shallow model's last token has seen little of the text (SmolLM2's state 2 is a better probe feature
    averaged over the prompt than at its end), while deep models gather the text at the last token."""
    layers = [_check_layer(cfg, layer) for layer in layers]
    check_pooling(pooling)

    def fn(lm_params, batch):
        hidden = _hidden_states(cfg, lm_params, batch)
        h = jnp.stack([hidden[layer] for layer in layers])  # [n, B, L, H]
        if pooling == "last":
            return jnp.take_along_axis(h, batch["last_index"][None, :, :, None], axis=2).astype(jnp.float32)
        h = h.astype(jnp.float32)
        member = jax.nn.one_hot(batch["segment_ids"] - 1, batch["last_index"].shape[1], dtype=jnp.float32)  # [B,L,S]
        sums = jnp.einsum("bls,nblh->nbsh", member, h, precision=jax.lax.Precision.HIGHEST)
        return sums / jnp.maximum(member.sum(1), 1.0)[None, :, :, None]
    return fn


def last_token_features_fn(cfg: LlamaConfig, layer: int):
    """(lm_params, batch) -> float32 [B, S, H]: the hidden state `layer` at each of a packed batch's `last_index`
    [B, S] (`batching.collate_packed`)."""
    fn = prompt_features_fn(cfg, [layer])
    return lambda lm_params, batch: fn(lm_params, batch)[0]


def frozen_params(cfg: LlamaConfig, lm_params):
    """`lm_params` with every matmul kernel and the embedding in the compute dtype: a frozen model's bfloat16
    forward then does not convert its float32 weights on every batch, and holds half the memory. The results are
    the same bits (the model casts them to that dtype itself); norm scales stay float32, as the model reads them."""
    dtype = jnp.dtype(cfg.dtype)
    if dtype == jnp.dtype(cfg.param_dtype):
        return lm_params
    cast = lambda path, p: p.astype(dtype) if path[-1].key in ("kernel", "embedding") else p
    return jax.tree_util.tree_map_with_path(cast, lm_params)


@functools.lru_cache(maxsize=16)
def _jitted_forward(cfg: LlamaConfig, layers: tuple[int, ...], pooling: str, mesh, rules):
    """(jitted forward, the frozen parameters' shardings) for `_map_prompts`: with `pooling` 'states', hidden state
    `layers[0]` at every position ([B, L, H]); else `prompt_features_fn`'s pooled states of `layers`
    ([len(layers), B, S, H]), float32. Built once per model config, layers, pooling and mesh, so a second
    extraction (the test set after the training pool) reuses the first one's compilations: jit caches them per
    function object."""
    shardings = parallel.param_shardings(LlamaForCausalLM(cfg), jnp.zeros((1, 8), jnp.int32), mesh, rules)
    if pooling == "states":
        fn = lambda p, b: _hidden_states(cfg, p, b)[layers[0]].astype(jnp.float32)
    else:
        fn = prompt_features_fn(cfg, layers, pooling)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(shardings, parallel.batch_sharding(mesh, rules)), out_shardings=replicated)
    return jitted, shardings


def _map_prompts(cfg: LlamaConfig, lm_params, encoded: Sequence[dict], layers: Sequence[int], pooling: str,
                 runtime, batch_size: int, what: str):
    """Yield (rows, host output) of the jitted forward (`_jitted_forward`) over the prompts of `encoded`, packed
    several to a row (`rows[r]` lists the indices into `encoded` that row r holds, in order) in batches of
    `batch_size` rows sharded over the runtime's mesh, the frozen parameters (`frozen_params`) placed on their
    FSDP/tensor shardings.

    Packing (`batching.packed_batches`), not padding each prompt to a length bucket: on short texts (sentiment
    prompts) a third of the positions of length-bucketed batches were padding. The price is attention over whole
    rows: a few percent for SmolLM2 on the sentiment task's rows of 96 (docs/BENCHMARKS.md)."""
    n_split = _batch_devices(runtime)
    if batch_size % n_split:
        raise ValueError(f"{what}: batch_size={batch_size} is not divisible by the {n_split} devices the "
                         f"mesh {dict(runtime.mesh.shape)} splits the batch over")
    layers = tuple(_check_layer(cfg, layer) for layer in layers)
    jitted, shardings = _jitted_forward(cfg, layers, pooling, runtime.mesh, runtime.rules)
    params = parallel.shard_params(frozen_params(cfg, lm_params), shardings)
    for rows, batch in batching.packed_batches([e["prompt"] for e in encoded], batch_size):
        with runtime.tracing():
            yield rows, to_host(jitted(params, runtime.put_batch(batch)))


def extract_features(cfg: LlamaConfig, lm_params, encoded: Sequence[dict], layer: int, runtime,
                     batch_size: int = 64, pooling: str = "last") -> np.ndarray:
    """Features [N, hidden] (float32) of hidden state `layer` at the last prompt token (`pooling='last'`) or averaged
    over the prompt's tokens (`'mean'`), in the order of `encoded`.

    `layer` indexes `(embeddings, layer_1, ..., layer_{N-1}, norm(layer_N))`; negative counts from the end (-1 is
    the final normed output the classification head reads). `encoded` comes from `batching.encode_examples` (any
    scoring: only the prompt is read). Prompts are packed into rows, `batch_size` rows a batch, sharded over the
    runtime's mesh; the frozen parameters are placed on their FSDP/tensor shardings. With `scan_layers=True` an
    intermediate layer holds every layer's states of a batch ([layers, B, L, H]) at once: lower `batch_size` if
    that does not fit.
    """
    return extract_layer_features(cfg, lm_params, encoded, [layer], runtime, batch_size, pooling)[0]


def extract_layer_features(cfg: LlamaConfig, lm_params, encoded: Sequence[dict], layers: Sequence[int], runtime,
                           batch_size: int = 64, pooling: str = "last") -> np.ndarray:
    """`extract_features` at several layers from one forward pass: [len(layers), N, hidden] float32."""
    check_pooling(pooling)
    out = np.zeros((len(layers), len(encoded), cfg.hidden_size), np.float32)
    for rows, feats in _map_prompts(cfg, lm_params, encoded, layers, pooling, runtime, batch_size,
                                    "extract_features"):
        for r, row in enumerate(rows):
            out[:, row] = feats[:, r, :len(row)]
    return out


def extract_prompt_states(cfg: LlamaConfig, lm_params, encoded: Sequence[dict], layer: int, runtime,
                          batch_size: int = 64) -> np.ndarray:
    """Hidden state `layer` at every prompt token: [sum of the prompt lengths, hidden] float32, the examples of
    `encoded` one after the other (`split_states` cuts them apart). What a model's top layers read when the layers
    up to `layer` are frozen (top_layers.py)."""
    lengths = [len(e["prompt"]) for e in encoded]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.zeros((int(starts[-1]), cfg.hidden_size), np.float32)
    for rows, states in _map_prompts(cfg, lm_params, encoded, [layer], "states", runtime, batch_size,
                                     "extract_prompt_states"):
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                out[starts[i]:starts[i + 1]] = states[r, at:at + lengths[i]]
                at += lengths[i]
    return out


def split_states(states: np.ndarray, encoded: Sequence[dict]) -> list[np.ndarray]:
    """`extract_prompt_states`'s rows cut into one [prompt length, hidden] array per example of `encoded`."""
    lengths = [len(e["prompt"]) for e in encoded]
    if states.ndim != 2 or states.shape[0] != sum(lengths):
        raise ValueError(f"prompt states of shape {states.shape} do not match {len(encoded)} prompts of "
                         f"{sum(lengths)} tokens in all (a stale cache? delete it to recompute)")
    return np.split(states, np.cumsum(lengths)[:-1])


def cached_features(path: str, fn: Callable[[], np.ndarray]) -> np.ndarray:
    """Load features from the .npy file `path`, or compute them with `fn()` and save them there (atomically,
    by process 0). The caller names the path after the model, layer and split."""
    if os.path.isfile(path):
        try:
            return np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable feature cache ({e}); delete it to recompute") from None
    feats = np.asarray(fn(), np.float32)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, path)
    return feats


# ------------------------------------------------------------------------------------------------ the probe
def probe_logits(params: ProbeParams, features) -> np.ndarray:
    """Logits [N, K] of a probe on features [N, H]."""
    x = (jnp.asarray(features, jnp.float32) - params.mean) / params.std
    return np.asarray(x @ params.weight + params.bias)


def probe_predict(params: ProbeParams, features) -> np.ndarray:
    """Predicted class [N] (argmax of the logits)."""
    return np.argmax(probe_logits(params, features), axis=-1)


def as_linear_head(params: ProbeParams) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [H, K], bias [K]) with features @ kernel + bias == probe_logits: the standardisation folded in."""
    weight, mean, std = (np.asarray(a, np.float64) for a in (params.weight, params.mean, params.std))
    kernel = weight / std[:, None]
    return kernel.astype(np.float32), (np.asarray(params.bias, np.float64) - mean @ kernel).astype(np.float32)


def fit_head_kernel(features, targets, **train_kwargs) -> np.ndarray:
    """A probe in the classification head's form (`features @ kernel`, no bias; models/heads.py): kernel [H, K].

    For `train.head_init='probe'`, linear probing then finetuning (Kumar et al., 2022): the head starts where a
    probe on the frozen features ends, instead of at zero. Fitted by `train_logreg(..., **train_kwargs)` on the
    features divided by their std (scaled, not centred: centring would need a bias the head does not have), so
    `l2` and `lr` mean what they mean for the standardised probes; the scale is folded back into the kernel."""
    x, _ = _check_data(features, targets, "fit_head_kernel")
    _, std = _standardization(x)
    params = train_logreg(x / std, targets, standardize=False, bias=False, **train_kwargs)
    return (np.asarray(params.weight, np.float64) / std[:, None]).astype(np.float32)


def _check_data(features, targets, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(features, np.float32), np.asarray(targets, np.float32)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"{what}: features must be [N, H] and targets [N, K] probabilities; got shapes "
                         f"{x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: {x.shape[0]} feature rows but {y.shape[0]} target rows")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no examples")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: features contain NaN or inf")
    if np.any(y < 0) or not np.allclose(y.sum(-1), 1.0, atol=1e-3):
        raise ValueError(f"{what}: every target row must be probabilities (non-negative, summing to 1)")
    return x, y


def _standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (1 for constant features, which centre to 0 anyway)."""
    mean = x.mean(0, dtype=np.float64)
    std = x.std(0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _accuracy(params: ProbeParams, features, targets) -> float:
    return float(np.mean(probe_predict(params, features) == np.argmax(targets, -1)))


def _make_epoch_fn(tx: optax.GradientTransformation, l2: float, use_bias: bool):
    """One jitted epoch: Adam steps over the minibatches `order` [steps, batch] of standardised features."""

    def loss_fn(w, x, y):
        logits = x @ w["weight"] + (w["bias"] if use_bias else 0.0)
        xent = -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits, -1), -1))
        return xent + 0.5 * l2 * jnp.sum(w["weight"] ** 2)

    def step(carry, idx):
        w, opt_state, x, y = carry
        loss, grads = jax.value_and_grad(loss_fn)(w, x[idx], y[idx])
        updates, opt_state = tx.update(grads, opt_state, w)
        return (optax.apply_updates(w, updates), opt_state, x, y), loss

    @jax.jit
    def epoch(w, opt_state, x, y, order):
        (w, opt_state, _, _), losses = jax.lax.scan(step, (w, opt_state, x, y), order)
        return w, opt_state, losses.mean()
    return epoch


def train_logreg(features, targets, *, l2: float = 1e-3, lr: float = 1e-2, epochs: int = 50,
                 batch_size: int = 256, seed: int = 0, val: Optional[tuple] = None, patience: int = 5,
                 standardize: bool = True, bias: bool = True,
                 callback: Optional[Callable[[int, dict], None]] = None) -> ProbeParams:
    """Fit a multinomial logistic-regression probe on soft targets [N, K] (weak labels or one-hot ground truth).

    Loss: mean cross-entropy against the targets + l2/2 * ||weight||^2 (no penalty on the bias). Adam with a cosine
    decay to 0 over `epochs`, minibatches of `batch_size` from a fresh permutation each epoch (the last partial
    batch is dropped; a different one each epoch). Weights start at zero, so the result depends only on the data
    and `seed`. Features are standardised with the train mean/std, stored in the params.

    `val=(features, targets)`: after every epoch, score the argmax accuracy against the validation targets' argmax;
    stop after `patience` epochs without a strictly better score and return the best epoch's params.
    `callback(epoch, {"loss": ..., "val_accuracy": ...})` is called after every epoch (1-based).
    """
    x, y = _check_data(features, targets, "train_logreg")
    if val is not None:
        vx, vy = _check_data(*val, "train_logreg val")
        if vx.shape[1] != x.shape[1] or vy.shape[1] != y.shape[1]:
            raise ValueError(f"train_logreg val: features/targets widths {vx.shape[1]}/{vy.shape[1]} differ from "
                             f"the training set's {x.shape[1]}/{y.shape[1]}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError(f"train_logreg: epochs={epochs}, batch_size={batch_size} and patience={patience} "
                         f"must be positive")
    n, h = x.shape
    k = y.shape[1]
    if standardize:
        mean, std = _standardization(x)
    else:
        mean, std = np.zeros(h, np.float32), np.ones(h, np.float32)
    xs = jnp.asarray((x - mean) / std)
    bs = min(batch_size, n)
    steps = n // bs
    tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps))
    w = {"weight": jnp.zeros((h, k), jnp.float32)}
    if bias:
        w["bias"] = jnp.zeros((k,), jnp.float32)
    opt_state = tx.init(w)
    run_epoch = _make_epoch_fn(tx, l2, bias)
    as_params = lambda w: ProbeParams(weight=np.asarray(w["weight"]),
                                      bias=np.asarray(w["bias"]) if bias else np.zeros(k, np.float32),
                                      mean=mean, std=std)
    rng = np.random.default_rng(seed)
    best, best_acc, since_best = None, -1.0, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)[:steps * bs].reshape(steps, bs)
        w, opt_state, loss = run_epoch(w, opt_state, xs, jnp.asarray(y), jnp.asarray(order))
        info = {"loss": float(loss)}
        if val is not None:
            params = as_params(w)
            info["val_accuracy"] = acc = _accuracy(params, vx, vy)
            if acc > best_acc:
                best, best_acc, since_best = params, acc, 0
            else:
                since_best += 1
        if callback is not None:
            callback(epoch, info)
        if val is not None and since_best >= patience:
            break
    return best if val is not None else as_params(w)


def cross_val_accuracy(features, labels, folds: int, seed: int, batch_size: int = 256, **train_kwargs) -> float:
    """Mean held-out accuracy of `train_logreg(..., **train_kwargs)` over `folds` folds of (features [N, H], class
    labels [N]), the folds a permutation by `seed`: how well a probe on these features would do, from training data
    alone (launch/probe_layers.py chooses a model's probe layer and pooling with it)."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    targets = np.eye(int(labels.max()) + 1, dtype=np.float32)[labels]
    scores = []
    for held in np.array_split(order, folds):
        fit = np.setdiff1d(order, held)
        params = train_logreg(features[fit], targets[fit], seed=seed, batch_size=min(batch_size, len(fit)),
                              **train_kwargs)
        scores.append(float(np.mean(probe_predict(params, features[held]) == labels[held])))
    return float(np.mean(scores))
