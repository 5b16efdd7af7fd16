"""Losses against hand-computed values (logits chosen so softmax gives round probabilities)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax import losses

log = math.log


def logits_for(probs):
    """Logits whose softmax is `probs` (rows of positive probabilities)."""
    return jnp.log(jnp.asarray(probs, jnp.float32))


# p rows: [.25, .75], [.75, .25], [.5, .5], [.25, .75]
P4 = [[0.25, 0.75], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]
T4 = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]]


def test_xent_matches_hand_value():
    loss = losses.get("xent")(logits_for(P4), jnp.asarray(T4), 0.3)
    expected = (
        log(4)  # -ln .25
        + 0.5 * (log(4 / 3) + log(4))
        + log(2)
        + (0.2 * log(4) + 0.8 * log(4 / 3))
    ) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_xent_gradient_is_p_minus_targets_over_batch():
    grad = jax.grad(lambda z: losses.get("xent")(z, jnp.asarray(T4), 0.0))(logits_for(P4))
    expected = (np.asarray(P4) - np.asarray(T4)) / 4
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_weighted_xent_weights_and_all_zero_weights():
    logits, targets = logits_for(P4[:2]), jnp.asarray(T4[:2])
    ce0, ce1 = log(4), 0.5 * (log(4 / 3) + log(4))
    got = losses.weighted_xent(logits, targets, jnp.asarray([1.0, 3.0]), None)
    assert float(got) == pytest.approx((ce0 + 3 * ce1) / 4, rel=1e-6)
    zero = losses.weighted_xent(logits, targets, jnp.zeros(2), None)
    assert float(zero) == 0.0
    grad = jax.grad(lambda z: losses.weighted_xent(z, targets, jnp.zeros(2), None))(logits)
    np.testing.assert_array_equal(grad, np.zeros((2, 2)))


def test_row_weights_zero_the_padding_rows_in_both_sums():
    """A padding row (no real candidate) counts 0 in the numerator and the denominator, whatever its weight."""
    mask = jnp.asarray([[True, True], [True, False], [False, False]])
    np.testing.assert_array_equal(losses.row_weights(jnp.asarray([1.0, 2.0, 5.0]), mask), [1.0, 2.0, 0.0])
    logits = jnp.concatenate([logits_for(P4[:2]), jnp.asarray([[3.0, -1.0]])])
    targets = jnp.concatenate([jnp.asarray(T4[:2]), jnp.zeros((1, 2))])
    ce = losses.per_example_xent(logits, targets, mask)
    got = losses.weighted_xent(logits, targets, jnp.ones(3), mask)
    assert float(got) == pytest.approx(float(ce[0] + ce[1]) / 2, rel=1e-6)  # / 2 real rows, not / 3


@pytest.mark.parametrize(
    "schedule, step_frac, expected",
    [
        ("linear", 0.0, 0.0),
        ("linear", 0.05, 0.25),
        ("linear", 0.1, 0.5),
        ("linear", 0.7, 0.5),
        ("openai_ref", 0.0, 0.0),
        ("openai_ref", 0.05, 0.025),
        ("openai_ref", 0.1, 0.05),  # the reference still ramps at exactly warmup_frac ...
        ("openai_ref", 0.1001, 0.5),  # ... and jumps right after
        ("openai_ref", 0.7, 0.5),
    ],
)
def test_aux_coef_schedules(schedule, step_frac, expected):
    got = losses.aux_coef_at(jnp.float32(step_frac), 0.5, 0.1, schedule)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_linear_schedule_without_warmup_is_aux_coef_at_once():
    assert float(losses.aux_coef_at(0.0, 0.75, 0.0, "linear")) == 0.75


# Binary batch for logconf: P(class 0) = .9, .1, .6, .4; class-1 target mass mean 0.5.
P_CONF = [[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]]
T_CONF = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]


def test_logconf_threshold_uses_linear_interpolation():
    # sorted p0 = .1 .4 .6 .9; quantile(0.5) = .4 + 0.5 * (.6 - .4) = 0.5 (the 'lower' method would give .4 and
    # harden row 3 to class 0).
    hard = losses.harden(logits_for(P_CONF), jnp.asarray(T_CONF), jnp.ones((4, 2), bool))
    np.testing.assert_array_equal(hard, [[1, 0], [0, 1], [1, 0], [0, 1]])


def test_logconf_threshold_tie_goes_to_class_0():
    # 5 rows, class-1 mass 0.25: position 0.25 * 4 = 1 exactly, so the threshold is the 2nd smallest p0 (.3),
    # and p0 >= threshold hardens that row to class 0, as in the reference.
    p0 = [0.5, 0.1, 0.9, 0.3, 0.7]
    probs = [[p, 1 - p] for p in p0]
    targets = jnp.asarray([[0.75, 0.25]] * 5)
    hard = losses.harden(logits_for(probs), targets, jnp.ones((5, 2), bool))
    np.testing.assert_array_equal(hard[:, 1], [0, 1, 0, 0, 0])


def test_logconf_threshold_matches_torch_quantile():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 2)).astype(np.float32) * 2
    w = rng.uniform(size=32).astype(np.float32)
    targets = np.stack([1 - w, w], axis=1)
    p0 = torch.softmax(torch.tensor(logits), -1)[:, 0]
    threshold = torch.quantile(p0, float(targets[:, 1].mean()))
    expected = torch.stack([p0 >= threshold, p0 < threshold], 1).float().numpy()
    hard = losses.harden(jnp.asarray(logits), jnp.asarray(targets), jnp.ones((32, 2), bool))
    np.testing.assert_array_equal(hard, expected)


@pytest.mark.parametrize("schedule, step_frac, a", [("linear", 0.05, 0.25), ("openai_ref", 0.05, 0.025),
                                                     ("linear", 1.0, 0.5), ("openai_ref", 0.5, 0.5)])
def test_logconf_loss_hand_value(schedule, step_frac, a):
    # hard = [1,0], [0,1], [1,0], [0,1] (test above); target = (1 - a) * t + a * hard.
    loss = losses.get("logconf", schedule=schedule)(logits_for(P_CONF), jnp.asarray(T_CONF), step_frac)
    rows = [
        -((a) * log(0.9) + (1 - a) * log(0.1)),
        -((1 - a) * log(0.1) + a * log(0.9)),
        -((0.5 * (1 - a) + a) * log(0.6) + 0.5 * (1 - a) * log(0.4)),
        -(0.5 * (1 - a) * log(0.4) + (0.5 * (1 - a) + a) * log(0.6)),
    ]
    assert float(loss) == pytest.approx(sum(rows) / 4, rel=1e-5)


def test_logconf_gradient_does_not_flow_through_targets():
    loss = losses.get("logconf", warmup_frac=0.0)
    grad = jax.grad(lambda z: loss(z, jnp.asarray(T_CONF), 0.5))(logits_for(P_CONF))
    hard = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    target = 0.5 * np.asarray(T_CONF) + 0.5 * hard
    np.testing.assert_allclose(grad, (np.asarray(P_CONF) - target) / 4, atol=1e-6)


def test_logconf_padding_row_changes_nothing():
    padded_logits = jnp.concatenate([logits_for(P_CONF), jnp.zeros((1, 2))])
    padded_targets = jnp.concatenate([jnp.asarray(T_CONF), jnp.zeros((1, 2))])
    mask = jnp.asarray([[True, True]] * 4 + [[False, False]])
    loss = losses.get("logconf")
    full = loss(logits_for(P_CONF), jnp.asarray(T_CONF), 0.5)
    assert float(loss(padded_logits, padded_targets, 0.5, mask)) == pytest.approx(float(full), rel=1e-6)


def test_logconf_many_candidates_hardens_to_argmax_of_valid_logits():
    # row 0: candidate 3 is masked (its large logit must be ignored); argmax of valid = 0. row 1: argmax = 1.
    logits = jnp.asarray([[2.0, 1.0, 0.0, 5.0], [0.0, 3.0, 1.0, 0.0]])
    mask = jnp.asarray([[True, True, True, False], [True, True, True, True]])
    targets = jnp.asarray([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    loss = losses.get("logconf", warmup_frac=0.0)(logits, targets, 0.0, mask)  # a = 0.5
    z0 = log(math.e**2 + math.e + 1)
    z1 = log(1 + math.e**3 + math.e + 1)
    row0 = -(0.5 * (2 - z0) + 0.5 * (1 - z0))  # target [.5, .5, 0, 0]
    row1 = -(0.25 * (0 - z1) + 0.5 * (3 - z1) + 0.25 * (1 - z1))  # target [.25, .5, .25, 0]
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_binary_mask_with_one_valid_candidate_uses_argmax():
    # With an invalid entry in a row, positions are not shared classes: argmax hardening, not the quantile.
    logits = logits_for([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    mask = jnp.asarray([[True, True], [True, False], [True, True]])
    hard = losses.harden(logits, jnp.asarray([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), mask)
    np.testing.assert_array_equal(hard, [[1, 0], [1, 0], [1, 0]])


def test_product_hand_values():
    logits = logits_for([[0.25, 0.75], [0.75, 0.25]])
    targets = jnp.asarray([[0.5, 0.5], [0.2, 0.8]])
    new, weights = losses.get("product").make_targets(logits, targets, 0.0)
    # row 0: [.125, .375] / .5 = [.25, .75]; row 1: [.15, .2] / .35 = [3/7, 4/7]
    np.testing.assert_allclose(new, [[0.25, 0.75], [3 / 7, 4 / 7]], rtol=1e-6)
    np.testing.assert_array_equal(weights, [1, 1])
    loss = losses.get("product")(logits, targets, 0.0)
    expected = (-(0.25 * log(0.25) + 0.75 * log(0.75)) - (3 / 7 * log(0.75) + 4 / 7 * log(0.25))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_product_alpha_beta():
    logits = logits_for([[0.25, 0.75]])
    targets = jnp.asarray([[0.5, 0.5]])
    # beta = 2, alpha = 1: [.0625, .5625] * .5 -> [0.1, 0.9]
    new, _ = losses.get("product", beta=2.0).make_targets(logits, targets, 0.0)
    np.testing.assert_allclose(new, [[0.1, 0.9]], rtol=1e-6)
    # alpha = 0 counts a zero target as 1 (torch.pow(0, 0) = 1): target = p
    new, _ = losses.get("product", alpha=0.0).make_targets(logits, jnp.asarray([[1.0, 0.0]]), 0.0)
    np.testing.assert_allclose(new, [[0.25, 0.75]], rtol=1e-6)


def test_product_does_not_underflow_and_falls_back_on_empty_rows():
    # The reference's pow/normalise gives 0/0 here (p1 = e^-200 underflows); the log-space form gives [0, 1].
    logits = jnp.asarray([[100.0, -100.0], [0.0, 0.0]])
    targets = jnp.asarray([[0.0, 1.0], [0.0, 0.0]])
    new, _ = losses.get("product").make_targets(logits, targets, 0.0)
    np.testing.assert_array_equal(new, [[0.0, 1.0], [0.0, 0.0]])
    assert np.isfinite(float(losses.get("product")(logits, targets, 0.0)))


def test_window_keeps_only_unsure_examples():
    probs = [[0.5, 0.5], [0.75, 0.25], [0.6, 0.4], [0.9, 0.1]]
    targets = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    _, weights = losses.get("window").make_targets(logits_for(probs), targets, 0.0)
    np.testing.assert_array_equal(weights, [1, 0, 1, 0])  # max p < 0.65
    loss = losses.get("window")(logits_for(probs), targets, 0.0)
    assert float(loss) == pytest.approx((log(2) - log(0.4)) / 2, rel=1e-6)
    _, weights = losses.get("window", radius=0.3).make_targets(logits_for(probs), targets, 0.0)
    np.testing.assert_array_equal(weights, [1, 1, 1, 0])  # max p < 0.8


def test_window_all_confident_is_zero_loss_without_nan():
    logits = logits_for([[0.9, 0.1], [0.05, 0.95]])
    targets = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    value, grad = jax.value_and_grad(lambda z: losses.get("window")(z, targets, 0.0))(logits)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros((2, 2)))


def test_entropy_soft_self_targets_and_gradient():
    logits = logits_for([[0.25, 0.75], [0.5, 0.5]])
    targets = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    loss = losses.get("entropy", warmup_frac=0.0)  # a = 0.5
    # targets' = .5 t + .5 p = [.625, .375], [.25, .75]
    expected = (-(0.625 * log(0.25) + 0.375 * log(0.75)) - (0.25 * log(0.5) + 0.75 * log(0.5))) / 2
    assert float(loss(logits, targets, 0.3)) == pytest.approx(expected, rel=1e-6)
    grad = jax.grad(lambda z: loss(z, targets, 0.3))(logits)
    new = np.array([[0.625, 0.375], [0.25, 0.75]])
    np.testing.assert_allclose(grad, (np.array([[0.25, 0.75], [0.5, 0.5]]) - new) / 2, atol=1e-6)


@pytest.mark.parametrize("name", losses.NAMES)
def test_masked_entries_never_produce_nan(name):
    logits = jnp.asarray([[1.0, jnp.inf, 0.5], [0.2, -0.3, jnp.nan], [-jnp.inf, 2.0, 1e30]])
    mask = jnp.asarray([[True, False, True], [True, True, False], [False, True, True]])
    targets = jnp.asarray([[0.3, 0.0, 0.7], [1.0, 0.0, 0.0], [0.0, 0.4, 0.6]])
    loss = losses.get(name)
    value, grad = jax.value_and_grad(lambda z: loss(z, targets, 0.5, mask))(logits)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)
    new, _ = loss.make_targets(logits, targets, 0.5, mask)
    np.testing.assert_array_equal(np.asarray(new)[~np.asarray(mask)], 0.0)


def test_jit_with_traced_step_frac_and_static_loss():
    loss = losses.get("logconf", schedule="openai_ref")
    fn = jax.jit(lambda l, z, t, s: l(z, t, s), static_argnums=0)
    for step_frac in (0.05, 0.5):
        eager = loss(logits_for(P_CONF), jnp.asarray(T_CONF), step_frac)
        jitted = fn(loss, logits_for(P_CONF), jnp.asarray(T_CONF), jnp.float32(step_frac))
        assert float(jitted) == pytest.approx(float(eager), rel=1e-6)
    assert losses.get("logconf", schedule="openai_ref") == loss  # equal settings -> equal (cache-friendly) key


def test_get_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown loss 'kl'.*xent, logconf, product, window, entropy"):
        losses.get("kl")
    with pytest.raises(ValueError, match="unknown argument.*radus.*valid: radius"):
        losses.get("window", radus=0.2)
    with pytest.raises(ValueError, match="unknown argument.*valid: none"):
        losses.get("xent", aux_coef=0.5)
    with pytest.raises(ValueError, match="schedule 'cosine'.*linear, openai_ref"):
        losses.get("logconf", schedule="cosine")


def test_hard_targets_one_hot():
    np.testing.assert_array_equal(losses.hard_targets(jnp.asarray([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
