"""Linear probes: feature extraction from a tiny random LLaMA (sharded and not) and logistic regression."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax import parallel, probe
from w2s_jax.data import batching
from w2s_jax.models import heads
from w2s_jax.models.llama import LlamaConfig, LlamaForCausalLM
from w2s_jax.train import Runtime, make_runtime

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def lm_params():
    variables = jax.jit(LlamaForCausalLM(CFG).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return nn.meta.unbox(variables["params"])


def make_encoded(n, seed=0, num_classes=2):
    """Encoded examples as `encode_examples` makes them; prompt lengths 3..50 span the 32 and 64 length buckets
    (four distinct lengths, so that the unpadded reference compiles little)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [1] + rng.integers(3, CFG.vocab_size, rng.choice([2, 16, 32, 49])).tolist()
        out.append({"src": i, "prompt": prompt, "cands": [[3 + c] for c in range(num_classes)],
                    "length": len(prompt)})
    return out


def single_device_runtime():
    return Runtime(parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1]), parallel.resolve_rules(None))


def unpadded_reference(lm_params, encoded, layer, pooling="last"):
    """Each prompt alone (no padding, no batching): hidden state `layer` at its last token, or its mean over the
    prompt's tokens."""
    model = LlamaForCausalLM(CFG)
    forward = jax.jit(lambda ids: model.apply({"params": lm_params}, ids, output_hidden_states=True)[1][layer])
    pool = (lambda h: h[-1]) if pooling == "last" else (lambda h: h.mean(0, dtype=np.float64))
    return np.stack([pool(np.asarray(forward(jnp.asarray([e["prompt"]]))[0])) for e in encoded]).astype(np.float32)


# ------------------------------------------------------------------------------------------------ features
def test_layer_zero_features_are_the_last_tokens_embeddings(lm_params):
    enc = make_encoded(5)
    feats = probe.extract_features(CFG, lm_params, enc, 0, single_device_runtime(), batch_size=4)
    table = np.asarray(lm_params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(feats, table[[e["prompt"][-1] for e in enc]])


@pytest.mark.parametrize("layer", [1, -1])
def test_sharded_extraction_equals_single_device_and_keeps_order(lm_params, layer):
    assert jax.device_count() == 8
    enc = make_encoded(13, seed=1)
    # the prompt alone is read: a `length` that counts candidate tokens (choice_lm encodings) changes nothing
    for e in enc[::3]:
        e["length"] += 40
    lengths = [len(e["prompt"]) for e in enc]
    assert lengths != sorted(lengths) and max(lengths) > 32 >= min(lengths)  # packing reorders the examples
    assert max(map(len, batching.pack_rows(lengths, 64))) > 1  # rows hold several prompts
    sharded = probe.extract_features(CFG, lm_params, enc, layer, make_runtime({"data": 1, "fsdp": -1, "tensor": 1}),
                                     batch_size=8)
    single = probe.extract_features(CFG, lm_params, enc, layer, single_device_runtime(), batch_size=8)
    assert sharded.shape == (13, CFG.hidden_size) and sharded.dtype == np.float32
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(single, unpadded_reference(lm_params, enc, layer), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_mean_pooled_features_are_each_prompts_mean_state(lm_params, layer):
    """Packed several to a row and sharded over 8 devices, each prompt's features are the mean of its own states
    (computed alone), never mixed with a neighbour's or with padding."""
    enc = make_encoded(13, seed=2)
    assert max(map(len, batching.pack_rows([len(e["prompt"]) for e in enc], 64))) > 1  # rows hold several prompts
    feats = probe.extract_features(CFG, lm_params, enc, layer, make_runtime({"data": 1, "fsdp": -1, "tensor": 1}),
                                   batch_size=8, pooling="mean")
    np.testing.assert_allclose(feats, unpadded_reference(lm_params, enc, layer, "mean"), atol=1e-5, rtol=1e-5)
    last = probe.extract_features(CFG, lm_params, enc, layer, single_device_runtime(), batch_size=8)
    assert np.abs(feats - last).max() > 1e-2  # a different feature (1,000x the tolerance), not the last token


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_several_layers_in_one_pass_equal_one_layer_at_a_time(lm_params, pooling):
    enc = make_encoded(7, seed=3)
    rt = single_device_runtime()
    together = probe.extract_layer_features(CFG, lm_params, enc, [0, -1, 1], rt, batch_size=4, pooling=pooling)
    apart = np.stack([probe.extract_features(CFG, lm_params, enc, layer, rt, batch_size=4, pooling=pooling)
                      for layer in (0, -1, 1)])
    assert together.shape == (3, 7, CFG.hidden_size)
    np.testing.assert_allclose(together, apart, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_frozen_params_hold_the_matmul_weights_in_the_compute_dtype(scan):
    cfg = CFG.replace(dtype="bfloat16", scan_layers=scan)
    variables = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), nn.meta.unbox(variables["params"]))
    frozen = probe.frozen_params(cfg, params)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(frozen)}
    for name, dtype in dtypes.items():  # norm scales (2-D when scanned) stay float32: the model reads them so
        assert dtype == (jnp.float32 if "scale" in name else jnp.bfloat16), name
    assert probe.frozen_params(CFG, params) is params  # float32 compute: nothing to cast


def test_bfloat16_features_are_those_of_the_float32_weights(lm_params):
    enc = make_encoded(9, seed=4)
    cfg = CFG.replace(dtype="bfloat16")
    feats = probe.extract_features(cfg, lm_params, enc, -1, single_device_runtime(), batch_size=4)
    model = LlamaForCausalLM(cfg)  # the float32 weights as given, each prompt alone
    forward = jax.jit(lambda ids: model.apply({"params": lm_params}, ids, output_hidden_states=True)[1][-1])
    ref = np.stack([np.asarray(forward(jnp.asarray([e["prompt"]]))[0, -1], np.float32) for e in enc])
    np.testing.assert_allclose(feats, ref, atol=2e-2, rtol=2e-2)


def test_extract_features_rejects_bad_layer_and_batch_size(lm_params):
    enc = make_encoded(2)
    with pytest.raises(ValueError, match=r"layer=3: .* valid layers are -3 \.\. 2"):
        probe.extract_features(CFG, lm_params, enc, 3, single_device_runtime())
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 8 devices"):
        probe.extract_features(CFG, lm_params, enc, -1, make_runtime({"fsdp": -1}), batch_size=6)
    with pytest.raises(ValueError, match=r"pooling='max': expected one of \['last', 'mean'\]"):
        probe.extract_features(CFG, lm_params, enc, -1, single_device_runtime(), pooling="max")


def test_a_second_extraction_reuses_the_first_ones_compilations(lm_params):
    """The forward is built once per (config, layer, mesh): extracting the test set after the training pool, or
    the prompt states of the same layer's model, compiles nothing new for shapes it has seen."""
    rt = single_device_runtime()
    enc = make_encoded(12, seed=4)
    probe._jitted_forward.cache_clear()
    first = probe.extract_features(CFG, lm_params, enc, 1, rt, batch_size=4)
    jitted, _ = probe._jitted_forward(CFG, (1,), "last", rt.mesh, rt.rules)
    compiled = jitted._cache_size()
    assert compiled >= 1
    np.testing.assert_array_equal(probe.extract_features(CFG, lm_params, enc, 1, rt, batch_size=4), first)
    probe.extract_features(CFG, lm_params, enc, -2, rt, batch_size=4)  # -2 is layer 1 of this 2-layer model
    assert jitted._cache_size() == compiled
    assert probe._jitted_forward.cache_info().misses == 1


def test_cached_features_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(3, 2)

    path = str(tmp_path / "cache" / "tiny_layer-1_train.npy")
    first = probe.cached_features(path, compute)
    second = probe.cached_features(path, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(second, [[0, 1], [2, 3], [4, 5]])


# ------------------------------------------------------------------------------------------------ probe vs head
def random_soft_targets(n, k, seed):
    logits = np.random.default_rng(seed).normal(size=(n, k)) * 2
    return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)


def head_logits(lm_params, encoded, kernel):
    batch = batching.collate(encoded, "classify")
    params = {"lm": lm_params, "head": {"kernel": jnp.asarray(kernel)}}
    return np.asarray(heads.candidate_logits(CFG, params, batch, "classify"))


def test_probe_without_standardisation_or_bias_is_the_classification_head(lm_params):
    enc = make_encoded(24, seed=2, num_classes=3)
    feats = probe.extract_features(CFG, lm_params, enc, -1, single_device_runtime(), batch_size=8)
    params = probe.train_logreg(feats, random_soft_targets(24, 3, 0), epochs=5, batch_size=8,
                                standardize=False, bias=False)
    np.testing.assert_array_equal(params.bias, np.zeros(3))
    np.testing.assert_array_equal(params.std, np.ones(CFG.hidden_size))
    assert np.abs(params.weight).max() > 0.01  # it trained
    np.testing.assert_allclose(probe.probe_logits(params, feats), head_logits(lm_params, enc, params.weight),
                               atol=1e-5, rtol=1e-5)


def test_standardised_probe_folds_into_a_head_plus_bias(lm_params):
    enc = make_encoded(24, seed=3, num_classes=3)
    feats = probe.extract_features(CFG, lm_params, enc, -1, single_device_runtime(), batch_size=8)
    params = probe.train_logreg(feats, random_soft_targets(24, 3, 1), epochs=5, batch_size=8)
    kernel, bias = probe.as_linear_head(params)
    np.testing.assert_allclose(probe.probe_logits(params, feats), head_logits(lm_params, enc, kernel) + bias,
                               atol=1e-5, rtol=1e-5)


def test_probe_logits_and_folding_by_hand():
    params = probe.ProbeParams(weight=np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
                               bias=np.array([0.5, -0.5], np.float32),
                               mean=np.array([1.0, 1.0], np.float32), std=np.array([2.0, 4.0], np.float32))
    feats = np.array([[3.0, 5.0], [1.0, 1.0], [1.0, 9.0]], np.float32)
    # standardised rows: [1, 1], [0, 0], [0, 2]
    np.testing.assert_allclose(probe.probe_logits(params, feats), [[1.5, 1.5], [0.5, -0.5], [0.5, 3.5]])
    np.testing.assert_array_equal(probe.probe_predict(params, feats), [0, 0, 1])
    kernel, bias = probe.as_linear_head(params)
    np.testing.assert_allclose(kernel, [[0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(bias, [0.0, -1.0])


# ------------------------------------------------------------------------------------------------ logistic regression
def planted_direction(n_train=2000, n_test=2000, h=32, flip=0.05, seed=0):
    """Gaussian features with labels sign(w.x) (train labels flipped with probability `flip`), shifted and scaled
    per feature so that standardisation matters."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=h)
    x = rng.normal(size=(n_train + n_test, h))
    labels = (x @ w > 0).astype(int)
    x = (x * rng.uniform(0.2, 5.0, h) + rng.normal(size=h) * 3).astype(np.float32)
    noisy = np.where(rng.random(n_train) < flip, 1 - labels[:n_train], labels[:n_train])
    return x[:n_train], np.eye(2, dtype=np.float32)[noisy], x[n_train:], labels[n_train:]


def test_probe_recovers_a_planted_linear_direction():
    # With N=2000, H=32 and 5% flipped train labels, the exact logistic-regression optimum (checked against
    # L-BFGS) is 0.95-0.98 accurate on clean test labels across seeds (1 - angle(w_hat, w) / pi); this seed: 0.97.
    x, y, x_test, labels_test = planted_direction()
    params = probe.train_logreg(x, y, seed=0)
    assert np.mean(probe.probe_predict(params, x_test) == labels_test) >= 0.95
    again = probe.train_logreg(x, y, seed=0)
    np.testing.assert_array_equal(again.weight, params.weight)  # deterministic from the seed
    other = probe.train_logreg(x, y, seed=1)
    assert not np.array_equal(other.weight, params.weight)  # the seed drives the minibatch order


def test_head_kernel_is_a_bias_free_probe_blind_to_each_features_scale():
    """`fit_head_kernel` (train.head_init='probe'): labels sign(w.x) need no bias, so the kernel alone recovers
    them; rescaling a feature rescales its kernel row inversely and changes nothing else (the fit sees the features
    divided by their std)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    x = rng.normal(size=(1200, 16)) * rng.uniform(0.2, 5.0, 16)
    labels = (x @ w > 0).astype(int)
    x = x.astype(np.float32)
    targets = np.eye(2, dtype=np.float32)[labels]
    fit = lambda feats: probe.fit_head_kernel(feats[:1000], targets[:1000], lr=0.05, epochs=20, batch_size=100)
    kernel = fit(x)
    assert kernel.shape == (16, 2) and kernel.dtype == np.float32
    assert np.mean(np.argmax(x[1000:] @ kernel, -1) == labels[1000:]) >= 0.95
    scale = rng.uniform(0.1, 10.0, 16).astype(np.float32)
    np.testing.assert_allclose(fit(x * scale), kernel / scale[:, None], rtol=1e-3, atol=1e-6)


def shortcut_case():
    """Train: a noisy real feature and a tiny feature that separates the train set perfectly. Without L2 the
    probe leans more and more on the shortcut; the validation labels sign(a + 5 s) are best matched mid-way
    (weight ratio ~5), so validation accuracy rises, peaks (epoch 5) and falls."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    sign = 2 * y - 1
    x = np.stack([sign + rng.normal(size=200), 0.1 * sign], 1).astype(np.float32)
    x_val = rng.normal(size=(1000, 2)).astype(np.float32)
    y_val = np.eye(2, dtype=np.float32)[(x_val @ [1.0, 5.0] > 0).astype(int)]
    return x, np.eye(2, dtype=np.float32)[y], x_val, y_val


@pytest.mark.parametrize("patience", [40, 3])
def test_early_stopping_returns_the_best_validation_params(patience):
    x, y, x_val, y_val = shortcut_case()
    history = []
    params = probe.train_logreg(x, y, l2=0.0, lr=0.1, epochs=40, batch_size=20, patience=patience,
                                standardize=False, val=(x_val, y_val),
                                callback=lambda epoch, info: history.append(info["val_accuracy"]))
    best_epoch = int(np.argmax(history)) + 1
    assert 1 < best_epoch < 10 and history[-1] < max(history)
    if patience == 40:
        assert len(history) == 40 and history[-1] < max(history) - 0.03  # later epochs really are worse
    else:
        assert len(history) == best_epoch + patience
    val_acc = np.mean(probe.probe_predict(params, x_val) == np.argmax(y_val, -1))
    assert val_acc == max(history)


def test_train_logreg_rejects_bad_targets():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="4 feature rows but 3 target rows"):
        probe.train_logreg(x, np.eye(2)[[0, 1, 0]])
    with pytest.raises(ValueError, match="must be probabilities"):
        probe.train_logreg(x, np.array([[1.0, 1.0]] * 4))
    with pytest.raises(ValueError, match="val: features/targets widths 2/2 differ from the training set's 3/2"):
        probe.train_logreg(x, np.eye(2)[[0, 1, 0, 1]], val=(np.zeros((2, 2)), np.eye(2)))


def test_cross_validation_scores_each_fold_on_data_it_did_not_fit():
    """With constant features a probe can only learn the class prior, so each fold predicts the majority class of
    the other folds: the score is then the majority class's share of each held-out fold, averaged. Features that
    carry the label score 1."""
    rng = np.random.default_rng(0)
    labels = (rng.random(60) < 0.7).astype(np.int64)
    kwargs = dict(l2=1e-3, lr=0.1, epochs=30, batch_size=16)
    got = probe.cross_val_accuracy(np.ones((60, 3), np.float32), labels, 4, seed=5, **kwargs)
    folds = np.array_split(np.random.default_rng(5).permutation(60), 4)
    assert got == pytest.approx(np.mean([labels[f].mean() for f in folds]))
    separable = np.eye(2, dtype=np.float32)[labels] + 0.01 * rng.standard_normal((60, 2)).astype(np.float32)
    assert probe.cross_val_accuracy(separable, labels, 4, seed=5, **kwargs) == 1.0
