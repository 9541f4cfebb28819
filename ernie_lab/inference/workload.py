"""What one benchmark pass of a task's eval split is, in the shape the engine times (see engine.py). Kept apart
from benchmark.py so the benchmark's child process imports only this, the task modules and numpy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from ernie_lab.errors import ConfigError
from ernie_lab.inference.batching import batches, unbatch
from ernie_lab.tasks import build_task


@dataclass(frozen=True)
class PadOnly:
    """All the benchmark child needs of the tokenizer: batches are padded with this id. (Tokenizing there
    would mean importing PaddleNLP in every child, ~20 s of CPU per evaluation.)"""

    pad_token_id: int


class EvalWorkload:
    """One benchmark pass over the eval split, for the engine: collate the features in batches of
    `benchmark.batch_size` (each padded to its longest sample, the seed's rule), then post-process the outputs
    to predictions. Tokenization runs and is timed in the parent (`tokenize_seconds`); the workload is pickled
    into the benchmark's child process with the examples and features."""

    def __init__(self, task, examples: list[dict], features: list[dict], batch_size: int, pad_to_multiple: int = 1):
        self.task_cfg = OmegaConf.to_container(task.cfg, resolve=True)
        self.examples, self.features = examples, features
        self.pad_token_id = task.tokenizer.pad_token_id
        self.batch_size = batch_size
        if int(pad_to_multiple) < 1:
            raise ConfigError(f"runtime.pad_to_multiple={pad_to_multiple} is not valid; choose an integer >= 1 "
                              "(1: pad each batch to its longest sample)")
        self.pad_to_multiple = int(pad_to_multiple)

    def setup(self) -> list[dict[str, np.ndarray]]:
        self.task = build_task(OmegaConf.create(self.task_cfg), PadOnly(self.pad_token_id))
        return self.collate(self.features)  # untimed: warm-up batches (and TensorRT's shape ranges)

    def tokenize(self) -> list[dict]:
        return self.features  # done in the parent

    def collate(self, features: list[dict]) -> list[dict[str, np.ndarray]]:
        self.chunks = list(batches(features, self.batch_size))
        collated = [self.task.collate(chunk) for chunk in self.chunks]
        if self.pad_to_multiple > 1:
            collated = [self.pad_length(batch) for batch in collated]
        self.batch_shapes = [tuple(int(d) for d in batch["input_ids"].shape) for batch in collated]
        return collated

    def pad_length(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch padded further, to the next multiple of `pad_to_multiple` tokens (never beyond the task's
        max_seq_length, unless its longest feature already is): fewer distinct shapes for the engine's per-shape
        kernel caches. The extra tokens are [PAD], which the model masks out of attention."""
        length = batch["input_ids"].shape[1]
        target = max(length, min(-(-length // self.pad_to_multiple) * self.pad_to_multiple,
                                 int(self.task_cfg["max_seq_length"])))
        if target == length:
            return batch
        fill = {"input_ids": self.pad_token_id}
        return {name: np.pad(array, ((0, 0), (0, target - length)), constant_values=fill.get(name, 0))
                for name, array in batch.items()}

    def finish(self, outputs: list) -> dict:
        rows = [row for chunk, arrays in zip(self.chunks, outputs) for row in unbatch(chunk, arrays, self.task.per_token_outputs)]
        lengths = [len(f["input_ids"]) for f in self.features]
        return {
            "predictions": self.task.postprocess(self.examples, self.features, rows),
            "features": len(self.features),
            "seq_len": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
            # each batch is padded to its longest feature (rounded up to runtime.pad_to_multiple): the lengths
            # the engine really ran
            "padded_seq_len_mean": float(np.mean([length for _, length in self.batch_shapes])),
            # (rows, padded length) of every batch the engine ran: the roofline's FLOPs
            "batch_shapes": self.batch_shapes,
        }
