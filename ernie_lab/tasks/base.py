"""The shape every task has. train/compress/infer only call these methods, so they never branch on the task.

Splits: `train` (train file minus the held-out slice), `heldout` (a fixed, seeded slice of the train file that
is never trained on: calibration, and model selection where the task has no dev split) and `eval` (the split
the seed reports on: dev for TNEWS and CMRC2018, test for MSRA_NER).

Bad input. A malformed line (bad JSON, non-UTF-8 bytes, a missing field, an unknown label or tag, a wrong column
count) is a DataError naming file, line and value. An example whose text is empty or whitespace only is skipped
when it comes from the train file (it has nothing to learn from) and kept in the eval split (the metric stays
over the whole split, comparable with the seed); both are counted in `read_counts`, which train.py logs as
`data.<split>_...` params, and a warning names their lines. Over-long texts are truncated or windowed per task."""
from __future__ import annotations

import json
import logging
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import DictConfig

from ernie_lab.errors import DataError, check_choice

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "eval")
SOURCES = ("local", "online")


def pad_batch(rows: Sequence[Sequence[int]], pad_value: int = 0, dtype=np.int64) -> np.ndarray:
    """Pad to the longest row of this batch (the seed's rule), not to max_seq_length."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def write_json_lines(path: Path, rows) -> None:
    """One JSON object per line, characters written as themselves (not \\u escapes)."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming file and line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set paths.data_dir or task.data.dir)")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


class Task(ABC):
    """One benchmark task: its data, features, model head, post-processing and metric."""

    name: str
    #: keys of the model's outputs, in the order of the exported model's fetch targets
    output_names: tuple[str, ...]
    #: the metric the seed table reports for this task
    primary_metric: str
    #: outputs have one row per token (cut to each feature's length) rather than one per feature
    per_token_outputs: bool = False
    #: file ending of the predictions file
    predictions_suffix: str = ".jsonl"
    #: raised whenever post-processing changes what the same model outputs score, so that an inference recorded
    #: before (ernie_lab.stages) is run again rather than reused
    output_revision: int = 1

    def __init__(self, cfg: DictConfig, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_seq_length = int(cfg.max_seq_length)
        check_choice("task.data.source", cfg.data.source, SOURCES)
        #: what the data policies skipped, kept or repaired while reading, as `<split>_<what>`: count
        self.read_counts: dict[str, int] = {}

    # ---- data -------------------------------------------------------------------------------------------
    def load(self, split: str) -> list[dict]:
        """Examples of a split, after the held-out slice and any configured limit."""
        check_choice("split", split, SPLITS)
        if split == "eval":
            examples = self.read_split(self.cfg.data.eval_split)
        else:
            examples = self.read_split("train")
            order = list(range(len(examples)))
            random.Random(int(self.cfg.data.heldout_seed)).shuffle(order)
            n = min(int(self.cfg.data.heldout_size), len(examples) // 2)
            chosen = sorted(order[:n]) if split == "heldout" else sorted(order[n:])
            examples = [examples[i] for i in chosen]
        limit = self.cfg.data.limit.get(split)
        return examples[: int(limit)] if limit is not None else examples

    def read_split(self, split: str) -> list[dict]:
        if self.cfg.data.source == "local":
            return self.read_local(Path(self.cfg.data.dir), split)
        return self.read_online(split)

    @abstractmethod
    def read_local(self, data_dir: Path, split: str) -> list[dict]:
        """Read a split from the offline copy (the ../shared/data layout)."""

    def report(self, split: str, what: str, places: list[str]) -> None:
        """Count the examples a data policy acted on in a split (`what` says what and what was done) and name
        where the first few are, so a user can find and fix them."""
        self.read_counts[f"{split}_{what}"] = len(places)
        if places:
            shown = ", ".join(places[:5]) + (f" and {len(places) - 5} more" if len(places) > 5 else "")
            log.warning("%s %s: %d %s: %s", self.name, split, len(places), what.replace("_", " "), shown)

    def keep_blank(self, split: str, places: list[str]) -> bool:
        """The blank-text policy: skip blank examples of the train file, keep those of the eval split.
        `places` are the blank examples found in the split; returns whether they stay."""
        keep = split != "train"
        self.report(split, "blank_texts_kept" if keep else "blank_texts_skipped", places)
        return keep

    @abstractmethod
    def read_online(self, split: str) -> list[dict]:
        """Read a split through PaddleNLP's dataset loader (downloads; needs internet)."""

    # ---- features ----------------------------------------------------------------------------------------
    @abstractmethod
    def featurize(self, examples: list[dict], training: bool) -> list[dict]:
        """Model inputs for the examples. Each feature has `input_ids`, `token_type_ids`, `example_index`
        and, when the labels are known, whatever `collate` turns into labels."""

    def collate(self, features: Sequence[dict], with_labels: bool = False) -> dict[str, np.ndarray]:
        batch = {
            "input_ids": pad_batch([f["input_ids"] for f in features], self.tokenizer.pad_token_id),
            "token_type_ids": pad_batch([f["token_type_ids"] for f in features]),
        }
        if with_labels:
            batch.update(self.collate_labels(features))
        return batch

    @abstractmethod
    def collate_labels(self, features: Sequence[dict]) -> dict[str, np.ndarray]:
        """The label arrays of a training batch."""

    # ---- model -------------------------------------------------------------------------------------------
    @abstractmethod
    def model_class(self):
        """The PaddleNLP ERNIE class with this task's head."""

    def head_config(self) -> dict:
        """Extra config the head needs (e.g. num_labels)."""
        return {}

    @abstractmethod
    def loss(self, outputs, batch: dict):
        """Training loss from the dygraph model's outputs and a collated batch (paddle tensors)."""

    def data_stats(self) -> dict[str, int]:
        """Counts worth logging from the last featurize (e.g. answers that had to be re-aligned)."""
        return {}

    # ---- predictions and metric ---------------------------------------------------------------------------
    @abstractmethod
    def postprocess(self, examples: list[dict], features: list[dict], outputs: list[tuple[np.ndarray, ...]]) -> list:
        """One prediction per example from per-feature outputs (each output trimmed to its feature's length)."""

    @abstractmethod
    def metrics(self, examples: list[dict], predictions: list) -> dict[str, float]:
        """Metric values in [0, 100], keyed by name; `primary_metric` among them."""

    @abstractmethod
    def write_predictions(self, examples: list[dict], predictions: list, path: Path) -> None:
        """The predictions file, in the task's documented format."""
