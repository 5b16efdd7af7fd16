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


def test_pack_rows_best_fit_longest_first():
    # by hand: 5 opens row 0 (3 free); 4 opens row 1 (4 free); the first 3 fills row 0 exactly (the smallest room
    # that fits); the second 3 goes to row 1 (1 free); 2 fits no room, opens row 2; 1 fills row 1
    assert batching.pack_rows([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = np.random.default_rng(0).integers(1, 40, 200).tolist()
    rows = batching.pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 64
    assert len(rows) <= np.ceil(sum(lengths) / 64) + 2  # nearly full rows
    with pytest.raises(ValueError, match="a sequence of 9 tokens does not fit rows of 8"):
        batching.pack_rows([3, 9], 8)


def test_collate_packed_restarts_positions_and_segments_per_prompt():
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    b = batching.collate_packed(prompts, [[2, 1], [0]], row_len=6, batch_rows=3, segments=2)
    np.testing.assert_array_equal(b["input_ids"], [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["attention_mask"], [[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(b["last_index"], [[3, 5], [2, 0], [0, 0]])


def test_packed_batches_keep_short_prompts_in_short_rows():
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 50, n).tolist() for n in [1000, *rng.integers(5, 60, 40), 300]]
    seen, shapes = [], {}
    for rows, batch in batching.packed_batches(prompts, 4):
        seen += [i for row in rows for i in row]
        longest = max(len(prompts[i]) for row in rows for i in row)
        shapes[longest] = batch["input_ids"].shape
        for r, row in enumerate(rows):  # each row holds its prompts one after the other
            np.testing.assert_array_equal(batch["input_ids"][r, :sum(len(prompts[i]) for i in row)],
                                          [t for i in row for t in prompts[i]])
    assert sorted(seen) == list(range(42))
    assert shapes[1000] == (4, 1024) and shapes[300] == (4, 320)  # a class of its own each
    assert all(shape == (4, 64) for longest, shape in shapes.items() if longest < 60)  # not 1024 long
