"""Calibration batches shared by the engines that quantize a float export themselves (ONNX Runtime static INT8,
OpenVINO/NNCF): the same held-out examples Paddle PTQ calibrates on, so the INT8 rows are comparable."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from omegaconf import DictConfig

from ernie_lab.artifacts import INPUT_NAMES
from ernie_lab.errors import ConfigError
from ernie_lab.inference.batching import batches


def calibration_feeds(cfg: DictConfig, task, same_width: bool) -> list[dict]:
    """Collated batches of the first quantize.batch_size*batch_nums held-out examples, as Paddle PTQ takes
    them. `same_width`: pad every batch to the longest (ORT's histogram calibrators stack all batches)."""
    q = cfg.quantize
    n = int(q.batch_size) * int(q.batch_nums)
    heldout = task.load("heldout")
    if len(heldout) < n:
        raise ConfigError(
            f"calibration wants {n} samples (quantize.batch_size*batch_nums) but the held-out slice "
            f"has {len(heldout)} (task.data.heldout_size)"
        )
    features = task.featurize(heldout[:n], training=False)[:n]  # as ptq_search.calibrate: n features at most
    feeds = [task.collate(chunk) for chunk in batches(features, int(q.batch_size))]
    if same_width:
        width = max(f[INPUT_NAMES[0]].shape[1] for f in feeds)
        pads = {INPUT_NAMES[0]: task.tokenizer.pad_token_id, INPUT_NAMES[1]: 0}
        feeds = [{k: np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=pads.get(k, 0)) for k, v in f.items()}
                 for f in feeds]
    return feeds


def feeds_digest(feeds: list[dict]) -> str:
    digest = hashlib.sha256()
    for feed in feeds:
        for name in INPUT_NAMES:
            digest.update(json.dumps(feed[name].shape).encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()[:16]
