"""train.group_by_length: batches of similar length, still a shuffle of every example, redrawn exactly on resume."""
from __future__ import annotations

import numpy as np

from ernie_lab.training import length_grouped_order
from tests.conftest import DATA_DIR


def msra_sentence_lengths(limit: int = 3000) -> np.ndarray:
    """Token counts ([CLS] + characters + [SEP], cut at 128) of the first real MSRA_NER training sentences."""
    lengths, current = [], 0
    with open(DATA_DIR / "msra_ner" / "train.txt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                current += 1
            elif current:
                lengths.append(min(current + 2, 128))
                current = 0
                if len(lengths) == limit:
                    break
    return np.array(lengths)


def mean_padded(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    return float(np.mean([lengths[order[i : i + batch_size]].max() for i in range(0, len(order), batch_size)]))


def test_grouped_order_is_a_permutation_with_less_padding():
    lengths = msra_sentence_lengths()
    batch_size = 16
    grouped = length_grouped_order(np.random.default_rng(0), lengths, batch_size)
    assert sorted(grouped.tolist()) == list(range(len(lengths)))
    plain = np.random.default_rng(0).permutation(len(lengths))
    assert mean_padded(lengths, grouped, batch_size) < 0.7 * mean_padded(lengths, plain, batch_size)
    # still shuffled: the batches do not come sorted by length
    batch_max = [lengths[grouped[i : i + batch_size]].max() for i in range(0, len(grouped), batch_size)]
    assert batch_max != sorted(batch_max) and batch_max != sorted(batch_max, reverse=True)


def test_a_short_last_batch_stays_last_and_slices_stay_aligned():
    lengths = np.arange(1, 1 + 16 * 7 + 5)  # 7 full batches of 16 and 5 left over, one pool
    order = length_grouped_order(np.random.default_rng(3), lengths, 16, pool_batches=8)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    for start in range(0, 16 * 7, 16):  # every slice of 16 is one batch of 16 consecutive lengths
        batch = lengths[order[start : start + 16]]
        assert batch.max() - batch.min() == 15
    assert sorted(lengths[order[16 * 7 :]].tolist()) == [1, 2, 3, 4, 5]  # the leftovers, last


def test_the_same_rng_state_redraws_the_same_order():
    lengths = msra_sentence_lengths(500)
    rng = np.random.default_rng(42)
    saved = rng.bit_generator.state
    first = length_grouped_order(rng, lengths, 16)
    rng.bit_generator.state = saved
    assert np.array_equal(first, length_grouped_order(rng, lengths, 16))
