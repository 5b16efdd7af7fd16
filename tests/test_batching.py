"""Host-side batching: bucketed shapes, epoch orders (plain and grouped by length), LM blocks."""
import numpy as np
import pytest

from w2s_jax.data import batching


def test_bucket_rounds_to_multiples_then_powers_of_two():
    assert [batching.bucket(n, 64) for n in (1, 64, 65, 2047, 2048, 2049)] == [64, 64, 128, 2048, 2048, 4096]


def test_epoch_order_is_a_fresh_permutation_per_epoch():
    order = batching.epoch_order(10, 5, seed=3, epochs=2)
    assert order.shape == (4, 5)
    assert sorted(order[:2].ravel()) == list(range(10)) and sorted(order[2:].ravel()) == list(range(10))
    np.testing.assert_array_equal(order, batching.epoch_order(10, 5, seed=3, epochs=2))
    assert batching.epoch_order(10, 5, seed=3, steps=3).shape == (3, 5)


def test_grouped_order_keeps_the_examples_and_pads_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 400, 256)
    plain = batching.epoch_order(256, 16, seed=1, epochs=2)
    grouped = batching.epoch_order(256, 16, seed=1, epochs=2, lengths=lengths, group=8)
    # the same multiset of examples in each run of 8 batches, only regrouped
    for s in range(0, len(plain), 8):
        assert sorted(plain[s:s + 8].ravel()) == sorted(grouped[s:s + 8].ravel())
    padded = lambda order: sum(lengths[b].max() * len(b) for b in order)
    assert padded(grouped) < 0.7 * padded(plain)
    np.testing.assert_array_equal(grouped, batching.epoch_order(256, 16, seed=1, epochs=2, lengths=lengths, group=8))


def test_lm_blocks_concatenate_documents_with_eos():
    blocks = batching.lm_blocks([[5, 6, 7], [8, 9]], seq_len=3, eos_id=2)
    np.testing.assert_array_equal(blocks, [[5, 6, 7, 2]])
    with pytest.raises(ValueError, match="shorter than one block"):
        batching.lm_blocks([[1]], seq_len=8, eos_id=2)
