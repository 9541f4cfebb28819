"""Metrics, as the reference implementations define them. Values are percentages (0-100)."""
from __future__ import annotations

from typing import Sequence


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    if len(gold) != len(predicted):
        raise ValueError(f"accuracy: {len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        return 0.0
    return 100.0 * sum(int(g == p) for g, p in zip(gold, predicted)) / len(gold)
