"""Training losses for weak-to-strong experiments.

Every loss here is a cross-entropy against a *stop-gradient target built from the whole batch*:

    targets', weights = loss.make_targets(logits, targets, step_frac, mask)   # no gradient
    loss = weighted_xent(logits, targets', weights, mask)

Splitting the two lets the trainer build the targets once from the full batch (the logconf threshold is a batch
quantile, as in the openai reference where the loss sees all 32 examples) and then accumulate gradients over
minibatches with `per_example_xent` on each slice.

Shapes (see docs/CONTRACTS.md): `logits [B, K]`, `targets [B, K]` probabilities (0 where masked), `mask [B, K]`
bool of real candidates (None = all real), `step_frac` = step / total_steps in [0, 1], possibly traced. A row with
no real candidate (batch padding) gets weight 0.

Names: `xent`, `logconf`, `product`, `window`, `entropy` (see `get`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Stands in for -inf on masked logits: exp() underflows to exactly 0, yet it stays finite, so no inf - inf or
# 0 * inf can appear. Logits are cast to float32 first, where this is representable.
MASKED_LOGIT = -1e9

SCHEDULES = ("linear", "openai_ref")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def _full_mask(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(logits.shape, dtype=bool)
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {mask.shape} does not match logits shape {logits.shape}")
    return mask.astype(bool)


def masked_log_softmax(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """log_softmax over the real candidates; masked entries get a large finite negative (never -inf or NaN)."""
    mask = _full_mask(logits, mask)
    logits = jnp.where(mask, logits.astype(jnp.float32), MASKED_LOGIT)
    return jax.nn.log_softmax(logits, axis=-1)


def masked_softmax(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax over the real candidates; exactly 0 at masked entries."""
    mask = _full_mask(logits, mask)
    return jnp.where(mask, jnp.exp(masked_log_softmax(logits, mask)), 0.0)


def hard_targets(label_idx: jax.Array, num_candidates: int) -> jax.Array:
    """One-hot float targets [B, K] from label indices [B]."""
    return jax.nn.one_hot(label_idx, num_candidates, dtype=jnp.float32)


def per_example_xent(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """CE_i = -sum_k t_ik log_softmax(logits_i)_k over the real candidates only, shape [B]."""
    mask = _full_mask(logits, mask)
    logp = masked_log_softmax(logits, mask)
    return -jnp.sum(jnp.where(mask, targets.astype(jnp.float32) * logp, 0.0), axis=-1)


def row_weights(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """The weight each row counts with: its own, or 0 for a row without a real candidate (batch padding).

    Both sums of `weighted_xent` use it, and so must a microbatched loss, or padding rows dilute the batch.
    """
    return weights.astype(jnp.float32) * jnp.any(mask, axis=-1)


def weighted_xent(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """sum_i w_i CE_i / sum_i w_i; 0 when every weight is 0. Rows without a real candidate get weight 0."""
    mask = _full_mask(logits, mask)
    weights = row_weights(weights, mask)
    total = jnp.sum(weights)
    weighted = jnp.sum(weights * per_example_xent(logits, targets, mask))
    return jnp.where(total > 0, weighted / jnp.where(total > 0, total, 1.0), 0.0)


def aux_coef_at(step_frac: jax.Array, aux_coef: float, warmup_frac: float, schedule: str) -> jax.Array:
    """The auxiliary weight a(step_frac).

    linear: aux_coef * min(1, step_frac / warmup_frac), the paper's warm-up (warmup_frac 0: aux_coef at once).
    openai_ref: the reference code's ramp, aux_coef * step_frac while step_frac <= warmup_frac, then aux_coef
    (so it climbs 0 -> warmup_frac * aux_coef and then jumps).
    """
    step_frac = jnp.asarray(step_frac, jnp.float32)
    if schedule == "linear":
        if warmup_frac <= 0:
            return jnp.asarray(aux_coef, jnp.float32)
        return aux_coef * jnp.minimum(1.0, step_frac / warmup_frac)
    if schedule == "openai_ref":
        return aux_coef * jnp.where(step_frac > warmup_frac, 1.0, step_frac)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def _argmax_one_hot(logits: jax.Array, mask: jax.Array) -> jax.Array:
    masked = jnp.where(mask, logits.astype(jnp.float32), MASKED_LOGIT)
    return hard_targets(jnp.argmax(masked, axis=-1), logits.shape[-1])


def _quantile_hard(probs: jax.Array, targets: jax.Array, rows: jax.Array) -> jax.Array:
    """The openai reference hardening for K=2 over the rows `rows`.

    threshold = quantile(p0, mean(targets[:, 1])) with linear interpolation; hard = [p0 >= t, p0 < t].
    """
    p0 = jnp.where(rows, probs[:, 0], jnp.nan)  # NaN rows are ignored by nanquantile
    count = jnp.sum(rows)
    positive_mass = jnp.sum(jnp.where(rows, targets[:, 1].astype(jnp.float32), 0.0)) / jnp.maximum(count, 1)
    threshold = jnp.nanquantile(p0, jnp.clip(positive_mass, 0.0, 1.0))
    return jnp.stack([p0 >= threshold, p0 < threshold], axis=-1).astype(jnp.float32)


def harden(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """The student's own hard labels for the confidence loss, [B, K] one-hot (no gradient).

    Binary (K=2, both candidates real in every non-padding row): the openai reference rule. The threshold on
    P(class 0) is the batch quantile at the targets' class-1 mass, so the hardened labels match the targets' class
    balance within the batch.
    Otherwise (K>2, or a mask with invalid entries): candidate positions are not classes shared across examples
    (chess: the legal moves of each position), so there is no class balance to match; hard = one-hot argmax of
    the student's real logits.
    """
    argmax_hard = _argmax_one_hot(logits, mask)
    if logits.shape[-1] != 2:
        return argmax_hard
    real_rows = jnp.any(mask, axis=-1)
    binary_rows = jnp.all(mask, axis=-1)
    quantile_hard = _quantile_hard(masked_softmax(logits, mask), targets, binary_rows)
    is_binary_batch = jnp.all(binary_rows | ~real_rows)
    return jnp.where(is_binary_batch, quantile_hard, argmax_hard)


# ----------------------------------------------------------------------------------------------------------------
# Target builders: (logits, targets, step_frac, mask, **kwargs) -> (new_targets [B, K], weights [B])
# ----------------------------------------------------------------------------------------------------------------


def _ones(logits: jax.Array) -> jax.Array:
    return jnp.ones(logits.shape[:1], jnp.float32)


def _xent_targets(logits, targets, step_frac, mask):
    """Cross-entropy against the given (soft or hard) targets."""
    del step_frac
    return jnp.where(mask, targets, 0.0), _ones(logits)


def _logconf_targets(logits, targets, step_frac, mask, aux_coef=0.5, warmup_frac=0.1, schedule="linear"):
    """Auxiliary confidence loss: (1 - a) * targets + a * harden(student)."""
    a = aux_coef_at(step_frac, aux_coef, warmup_frac, schedule)
    new = (1.0 - a) * targets + a * harden(logits, targets, mask)
    return jnp.where(mask, new, 0.0), _ones(logits)


def _entropy_targets(logits, targets, step_frac, mask, aux_coef=0.5, warmup_frac=0.1, schedule="linear"):
    """logconf without hardening (EleutherAI): (1 - a) * targets + a * softmax(student)."""
    a = aux_coef_at(step_frac, aux_coef, warmup_frac, schedule)
    new = (1.0 - a) * targets + a * masked_softmax(logits, mask)
    return jnp.where(mask, new, 0.0), _ones(logits)


def _product_targets(logits, targets, step_frac, mask, alpha=1.0, beta=1.0):
    """target ∝ p^beta * targets^alpha over the real candidates.

    Computed in log space, which equals the reference's pow/normalise but cannot underflow to 0/0. A row with no
    real candidate of positive mass falls back to the given targets.
    """
    del step_frac
    logp = masked_log_softmax(logits, mask)
    positive = mask & (targets > 0)
    if alpha == 0:  # targets^0 = 1 on every real candidate, as torch.pow(0, 0) = 1
        log_t, support = jnp.zeros_like(logp), mask
    else:
        log_t = alpha * jnp.log(jnp.where(positive, targets, 1.0))
        support = positive
    log_target = jnp.where(support, beta * logp + log_t, MASKED_LOGIT)
    product = jnp.where(support, jax.nn.softmax(log_target, axis=-1), 0.0)
    has_support = jnp.any(support, axis=-1, keepdims=True)
    return jnp.where(has_support, product, jnp.where(mask, targets, 0.0)), _ones(logits)


def _window_targets(logits, targets, step_frac, mask, radius=0.15):
    """EleutherAI window loss: only examples where the student is unsure (max real prob < 0.5 + radius) count."""
    del step_frac
    max_prob = jnp.max(masked_softmax(logits, mask), axis=-1)
    weights = (max_prob < 0.5 + radius).astype(jnp.float32)
    return jnp.where(mask, targets, 0.0), weights


_BUILDERS: dict[str, tuple[Callable, dict[str, Any]]] = {
    "xent": (_xent_targets, {}),
    "logconf": (_logconf_targets, {"aux_coef": 0.5, "warmup_frac": 0.1, "schedule": "linear"}),
    "product": (_product_targets, {"alpha": 1.0, "beta": 1.0}),
    "window": (_window_targets, {"radius": 0.15}),
    "entropy": (_entropy_targets, {"aux_coef": 0.5, "warmup_frac": 0.1, "schedule": "linear"}),
}

NAMES = tuple(_BUILDERS)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A named loss with its settings; hashable, so it can be a static argument of `jax.jit`.

    `make_targets` builds the stop-gradient targets and per-example weights from the full batch; calling the loss
    is `weighted_xent` against them.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def make_targets(
        self, logits: jax.Array, targets: jax.Array, step_frac: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        if targets.shape != logits.shape:
            raise ValueError(f"targets shape {targets.shape} does not match logits shape {logits.shape}")
        mask = _full_mask(logits, mask)
        builder, _ = _BUILDERS[self.name]
        new_targets, weights = builder(
            logits.astype(jnp.float32), targets.astype(jnp.float32), step_frac, mask, **dict(self.params)
        )
        return jax.lax.stop_gradient(new_targets), jax.lax.stop_gradient(weights)

    def __call__(
        self, logits: jax.Array, targets: jax.Array, step_frac: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        new_targets, weights = self.make_targets(logits, targets, step_frac, mask)
        return weighted_xent(logits, new_targets, weights, mask)


def _check_params(name: str, params: dict[str, Any]) -> None:
    if "schedule" in params and params["schedule"] not in SCHEDULES:
        raise ValueError(f"loss {name!r}: unknown schedule {params['schedule']!r}; valid: {', '.join(SCHEDULES)}")
    if params.get("warmup_frac", 0.0) < 0:
        raise ValueError(f"loss {name!r}: warmup_frac must be >= 0, got {params['warmup_frac']}")
    if not 0.0 <= params.get("aux_coef", 0.0) <= 1.0:
        raise ValueError(f"loss {name!r}: aux_coef must be in [0, 1], got {params['aux_coef']}")
    if params.get("radius", 0.0) < 0:
        raise ValueError(f"loss {name!r}: radius must be >= 0, got {params['radius']}")


def get(name: str, **kwargs: Any) -> Loss:
    """The loss `name` with `kwargs` over its defaults.

    xent                                   CE against the given targets.
    logconf(aux_coef, warmup_frac, schedule)  auxiliary confidence loss (hardened self-targets, see `harden`).
    product(alpha, beta)                   target ∝ p^beta * targets^alpha.
    window(radius)                         CE only where the student's max prob < 0.5 + radius.
    entropy(aux_coef, warmup_frac, schedule)  logconf with soft self-targets.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(NAMES)}")
    _, defaults = _BUILDERS[name]
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ValueError(f"loss {name!r}: unknown argument(s) {', '.join(unknown)}; valid: {valid}")
    params = {**defaults, **kwargs}
    _check_params(name, params)
    return Loss(name, tuple(sorted(params.items())))
