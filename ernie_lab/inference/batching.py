"""Batches in dataset order (the seed's rule: each batch padded to its own longest sample) and the way back
from batched outputs to one output tuple per feature."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def batches(features: Sequence[dict], batch_size: int) -> Iterator[Sequence[dict]]:
    for start in range(0, len(features), batch_size):
        yield features[start : start + batch_size]


def unbatch(batch_features: Sequence[dict], arrays: Sequence[np.ndarray], per_token: bool) -> list[tuple[np.ndarray, ...]]:
    """Row i of every output array, cut to feature i's real length when outputs are per token."""
    out = []
    for i, feature in enumerate(batch_features):
        n = len(feature["input_ids"])
        out.append(tuple(a[i, :n] if per_token else a[i] for a in arrays))
    return out
