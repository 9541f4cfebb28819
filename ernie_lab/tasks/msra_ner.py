"""MSRA NER (SIGHAN 2006): character-level BIO tagging of PER/ORG/LOC, entity-level F1 on the test split.

Each character is exactly one model token, so predictions map back to characters without any alignment
guesswork. Sentences longer than a window (max_seq_length - 2 characters) are cut into overlapping windows;
every character is predicted by exactly one window (the one where it sits furthest from an edge), so the
metric always covers every character of the split.

Decoding: the tag sequence of a sentence is the most probable one that BIO allows (Viterbi over the characters'
log-probabilities; an I-X only after B-X or I-X), not each character's own argmax. Argmax leaves fragments such as
O I-PER I-PER that seqeval reads as a separate entity; on the converged e5-small model the constraint raised test
F1 from 87.63 to 89.00 (docs/long-runs.md, "Status").

Bad input: a line without exactly two tab-separated columns, an unknown tag or non-UTF-8 bytes is a DataError
naming file and line. An `I-X` that does not continue an X entity (after O, or after another type) is repaired
to `B-X`: that is how seqeval's default mode, and so our metric, reads it anyway, so scores do not change and
the model learns one consistent tagging; repairs are counted and their lines named. A sentence of whitespace
characters only is skipped in the train file and kept in test, counted either way (see tasks/base.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ernie_lab.errors import ConfigError, DataError
from ernie_lab.tasks.base import Task, pad_batch, write_json_lines

LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
ENTITY_TYPES = ("PER", "ORG", "LOC")
#: label of [CLS], [SEP] and padding: paddle's cross_entropy skips it
IGNORE_INDEX = -100


def breaks_bio(before: str | None, tag: str) -> bool:
    """`tag` cannot follow `before` (None: the sentence's start) in BIO: an I-X that does not continue an X entity."""
    return tag.startswith("I-") and (before is None or before[2:] != tag[2:])


def repair_lone_inside(tags: list[str]) -> list[int]:
    """Turn every I-X that does not continue an X entity into B-X, in place; returns the positions changed."""
    repaired = []
    for i, tag in enumerate(tags):
        if breaks_bio(tags[i - 1] if i else None, tag):
            tags[i] = "B-" + tag[2:]
            repaired.append(i)
    return repaired


def read_char_tags(path: Path, with_lines: bool = False) -> list[dict]:
    """Sentences of a `字<TAB>TAG` file (blank line between sentences) as {"id", "chars", "tags"}, plus
    `line` (the file line of the first character; character i is on line + i) when asked."""
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set paths.data_dir or task.data.dir)")
    known = set(LABELS)
    examples: list[dict] = []
    chars: list[str] = []
    tags: list[str] = []
    first_line = 0

    def close_sentence() -> None:
        if chars:
            examples.append({"id": len(examples), "chars": list(chars), "tags": list(tags)})
            if with_lines:
                examples[-1]["line"] = first_line
            chars.clear()
            tags.clear()

    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                close_sentence()
                continue
            columns = line.split("\t")
            if len(columns) != 2 or not columns[0]:
                raise DataError(
                    f"{path}:{lineno}: expected 2 tab-separated columns (character, tag), got {len(columns)}: {line!r}"
                )
            if columns[1] not in known:
                raise DataError(f"{path}:{lineno}: unknown tag {columns[1]!r}; tags are {', '.join(LABELS)}")
            if not chars:
                first_line = lineno
            chars.append(columns[0])
            tags.append(columns[1])
    close_sentence()
    return examples


def _bio_transitions() -> tuple[np.ndarray, np.ndarray]:
    """(allowed first tags, allowed[i, j]: tag j may follow tag i) as additive scores: 0 or -inf."""
    first = np.array([-np.inf if breaks_bio(None, tag) else 0.0 for tag in LABELS])
    follows = np.array([[-np.inf if breaks_bio(before, tag) else 0.0 for tag in LABELS] for before in LABELS])
    return first, follows


BIO_FIRST, BIO_FOLLOWS = _bio_transitions()


def decode_bio(log_probs: np.ndarray) -> list[int]:
    """The label indices of the most probable tag sequence that BIO allows, for one sentence's [chars, labels]
    log-probabilities."""
    score = log_probs[0] + BIO_FIRST
    back = np.empty((len(log_probs), len(LABELS)), dtype=np.int64)
    for t in range(1, len(log_probs)):
        candidates = score[:, None] + BIO_FOLLOWS  # [previous, next]
        back[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_probs[t]
    path = [int(score.argmax())]
    for t in range(len(log_probs) - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return path[::-1]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Window(NamedTuple):
    """Characters [start, end) go into one feature; it predicts characters [own_start, own_end)."""

    start: int
    end: int
    own_start: int
    own_end: int


def plan_windows(length: int, window: int, stride: int) -> list[Window]:
    """Windows of at most `window` characters, starting `stride` apart, the last one ending at `length`.

    Where windows overlap, a character belongs to the window in which it is furthest from an edge (the earlier
    window on a tie), so every character is predicted exactly once and with as much context as there is. All
    windows have the same size, so that is the window whose centre is nearest: ownership changes hands at the
    midpoint between two consecutive centres."""
    if length <= window:
        return [Window(0, length, 0, length)]
    starts = [*range(0, length - window, stride), length - window]
    plan: list[Window] = []
    for w, start in enumerate(starts):
        own_start = plan[-1].own_end if plan else 0
        own_end = (start + starts[w + 1] + window - 1) // 2 + 1 if w + 1 < len(starts) else length
        plan.append(Window(start, start + window, own_start, own_end))
    return plan


class MsraNerTask(Task):
    name = "msra_ner"
    output_names = ("logits",)
    primary_metric = "f1"
    per_token_outputs = True
    predictions_suffix = ".jsonl"
    output_revision = 2  # 2: BIO-constrained Viterbi decoding (1: per-character argmax)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.window = self.max_seq_length - 2
        self.doc_stride = int(cfg.doc_stride)
        if self.window < 1:
            raise ConfigError(f"task.max_seq_length={self.max_seq_length} leaves no room for characters")
        if not 1 <= self.doc_stride <= self.window:
            raise ConfigError(
                f"task.doc_stride={self.doc_stride} must be between 1 and max_seq_length-2={self.window}"
            )
        self.label_index = {label: i for i, label in enumerate(LABELS)}
        self._char_ids: dict[str, int] = {}

    @property
    def num_labels(self) -> int:
        return len(LABELS)

    # ---- data -------------------------------------------------------------------------------------------
    def read_local(self, data_dir: Path, split: str) -> list[dict]:
        path = data_dir / f"{split}.txt"
        examples = read_char_tags(path, with_lines=True)
        repaired = [f"{path}:{ex['line'] + i}" for ex in examples for i in repair_lone_inside(ex["tags"])]
        self.report(split, "lone_inside_tags_repaired", repaired)
        blank = [f"{path}:{ex['line']}" for ex in examples if not "".join(ex["chars"]).strip()]
        if not self.keep_blank(split, blank):
            examples = [ex for ex in examples if "".join(ex["chars"]).strip()]
        for ex in examples:
            del ex["line"]
        return examples

    def read_online(self, split: str) -> list[dict]:
        from paddlenlp.datasets import load_dataset

        ds = load_dataset("msra_ner", splits=split)
        names = list(ds.label_list)  # PaddleNLP turns tag strings into indices of its own label list
        examples = []
        for i, ex in enumerate(ds):
            tags = [names[t] if isinstance(t, (int, np.integer)) else str(t) for t in ex["labels"]]
            if len(tags) != len(ex["tokens"]):
                raise DataError(f"msra_ner {split} sentence {i}: {len(ex['tokens'])} characters but {len(tags)} tags")
            unknown = sorted(set(tags) - set(LABELS))
            if unknown:
                raise DataError(f"msra_ner {split} sentence {i}: unknown tags {unknown}; tags are {', '.join(LABELS)}")
            examples.append({"id": i, "chars": list(ex["tokens"]), "tags": tags})
        self.report(split, "lone_inside_tags_repaired",
                    [f"sentence {ex['id']}" for ex in examples if repair_lone_inside(ex["tags"])])
        return examples

    # ---- features ----------------------------------------------------------------------------------------
    def char_id(self, char: str) -> int:
        """One vocabulary id per character: its first word piece, or [UNK] when it tokenizes to nothing
        (control characters, spaces), so characters and tokens stay one-to-one."""
        if char not in self._char_ids:
            pieces = self.tokenizer.tokenize(char)
            token = pieces[0] if pieces else self.tokenizer.unk_token
            self._char_ids[char] = int(self.tokenizer.convert_tokens_to_ids(token))
        return self._char_ids[char]

    def featurize(self, examples: list[dict], training: bool) -> list[dict]:
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        features = []
        for index, ex in enumerate(examples):
            ids = [self.char_id(c) for c in ex["chars"]]
            labels = [self.label_index[t] for t in ex["tags"]] if ex.get("tags") is not None else None
            if training and (labels is None or not ids):
                continue
            for win in plan_windows(len(ids), self.window, self.doc_stride):
                feature: dict[str, Any] = {
                    "input_ids": [cls_id, *ids[win.start : win.end], sep_id],
                    "token_type_ids": [0] * (win.end - win.start + 2),
                    "example_index": index,
                    "window": tuple(win),
                }
                if labels is not None:
                    feature["labels"] = [IGNORE_INDEX, *labels[win.start : win.end], IGNORE_INDEX]
                features.append(feature)
        return features

    def collate_labels(self, features: Sequence[dict]) -> dict[str, np.ndarray]:
        return {"labels": pad_batch([f["labels"] for f in features], pad_value=IGNORE_INDEX)}

    # ---- model -------------------------------------------------------------------------------------------
    def model_class(self):
        from paddlenlp.transformers import ErnieForTokenClassification

        return ErnieForTokenClassification

    def head_config(self) -> dict:
        return {"num_labels": self.num_labels}

    def loss(self, outputs, batch):
        import paddle.nn.functional as F

        return F.cross_entropy(outputs, batch["labels"], ignore_index=IGNORE_INDEX)

    # ---- predictions and metric ---------------------------------------------------------------------------
    def postprocess(self, examples, features, outputs) -> list[list[str]]:
        """Per example, one predicted tag per character: the sentence's BIO-valid Viterbi path over the
        log-probabilities of each character's owning window."""
        log_probs = [np.full((len(ex["chars"]), len(LABELS)), np.nan) for ex in examples]
        for feature, (logits,) in zip(features, outputs):
            win = Window(*feature["window"])
            # +1: [CLS] comes first
            log_probs[feature["example_index"]][win.own_start:win.own_end] = \
                log_softmax(np.asarray(logits[win.own_start - win.start + 1:win.own_end - win.start + 1], np.float64))
        predicted = []
        for index, rows in enumerate(log_probs):
            if np.isnan(rows).any():
                raise RuntimeError(f"msra_ner: example {index} has characters no window predicted")
            predicted.append([LABELS[i] for i in decode_bio(rows)] if len(rows) else [])
        return predicted

    def metrics(self, examples, predictions) -> dict[str, float]:
        from ernie_lab.metrics import entity_f1

        return entity_f1([ex["tags"] for ex in examples], predictions, types=ENTITY_TYPES)

    def write_predictions(self, examples, predictions, path: Path) -> None:
        write_json_lines(path, ({
            "id": ex["id"],
            "chars": ex["chars"],
            "gold_tags": ex.get("tags"),
            "predicted_tags": tags,
        } for ex, tags in zip(examples, predictions)))
