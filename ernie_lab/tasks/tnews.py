"""TNEWS: 15-class news-title classification (CLUE), accuracy on dev.

Bad input: a malformed line, an unknown label (not in labels.json) or a training line without a label is a
DataError naming file and line. An empty or whitespace-only sentence is skipped in the train file and kept
(and predicted) in dev, counted either way (see tasks/base.py). Sentences longer than max_seq_length tokens
are truncated."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ernie_lab.errors import DataError
from ernie_lab.tasks.base import Task, read_json_lines, write_json_lines


class TnewsTask(Task):
    name = "tnews"
    output_names = ("logits",)
    primary_metric = "accuracy"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.label_ids, self.label_descs = self._read_labels()

    def _read_labels(self) -> tuple[list[str], list[str]]:
        if self.cfg.data.source == "online":
            from paddlenlp.datasets import load_dataset

            labels = load_dataset("clue", "tnews", splits="dev").label_list
            return list(labels), list(labels)
        path = Path(self.cfg.data.dir) / "labels.json"
        rows = read_json_lines(path)
        ids, descs = [], []
        for lineno, obj in rows:
            if "label" not in obj:
                raise DataError(f"{path}:{lineno}: no 'label' field")
            ids.append(str(obj["label"]))
            descs.append(str(obj.get("label_desc", obj["label"])))
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise DataError(f"{path}: needs two or more distinct labels, found {ids}")
        return ids, descs

    @property
    def num_labels(self) -> int:
        return len(self.label_ids)

    def read_local(self, data_dir: Path, split: str) -> list[dict]:
        path = data_dir / f"{split}.json"
        index = {label: i for i, label in enumerate(self.label_ids)}
        examples, blank = [], []
        for lineno, obj in read_json_lines(path):
            text = obj.get("sentence")
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: missing or non-string 'sentence'")
            label = obj.get("label")
            if label is not None and str(label) not in index:
                raise DataError(
                    f"{path}:{lineno}: unknown label {label!r}; labels.json has {', '.join(self.label_ids)}"
                )
            if label is None and split == "train":
                raise DataError(f"{path}:{lineno}: no 'label' (every training line needs one of labels.json's)")
            if not text.strip():
                blank.append(f"{path}:{lineno}")
            examples.append({
                "id": obj.get("id", lineno - 1),
                "text": text,
                "label": index[str(label)] if label is not None else None,
            })
        if not self.keep_blank(split, blank):
            examples = [ex for ex in examples if ex["text"].strip()]
        return examples

    def read_online(self, split: str) -> list[dict]:
        from paddlenlp.datasets import load_dataset

        ds = load_dataset("clue", "tnews", splits=split)
        return [{"id": i, "text": ex["sentence"], "label": int(ex["label"])} for i, ex in enumerate(ds)]

    def featurize(self, examples: list[dict], training: bool) -> list[dict]:
        features = []
        for i, ex in enumerate(examples):
            enc = self.tokenizer(ex["text"], max_length=self.max_seq_length, truncation=True)
            features.append({
                "input_ids": enc["input_ids"],
                "token_type_ids": enc["token_type_ids"],
                "label": ex["label"],
                "example_index": i,
            })
        return features

    def collate_labels(self, features: Sequence[dict]) -> dict[str, np.ndarray]:
        return {"labels": np.array([f["label"] for f in features], dtype=np.int64)}

    def model_class(self):
        from ernie_lab.tasks.heads import ErnieSequenceClassifier

        return ErnieSequenceClassifier

    def head_config(self) -> dict:
        return {"num_labels": self.num_labels}

    def loss(self, outputs, batch):
        import paddle.nn.functional as F

        return F.cross_entropy(outputs, batch["labels"])

    def postprocess(self, examples, features, outputs) -> list[int]:
        predictions = [0] * len(examples)
        for feature, (logits,) in zip(features, outputs):
            predictions[feature["example_index"]] = int(np.argmax(logits))
        return predictions

    def metrics(self, examples, predictions) -> dict[str, float]:
        from ernie_lab.metrics import accuracy

        return {"accuracy": accuracy([ex["label"] for ex in examples], predictions)}

    def write_predictions(self, examples, predictions, path: Path) -> None:
        write_json_lines(path, ({
            "id": ex["id"],
            "sentence": ex["text"],
            "label": self.label_ids[pred],
            "label_desc": self.label_descs[pred],
            "gold": self.label_ids[ex["label"]] if ex["label"] is not None else None,
        } for ex, pred in zip(examples, predictions)))


