"""CMRC 2018: Chinese span-extraction reading comprehension, EM and F1 on dev (official evaluator's rules).

A question and its context become one or more windows of at most max_seq_length tokens:
`[CLS] question [SEP] context[window] [SEP]`. Windows start `doc_stride` context tokens apart (the step between
window starts, as in BERT's run_squad and PaddleNLP's tokenizer, not their overlap). The tokenizer's offset
mapping ties every context token to a span of context characters, so answers go from characters to tokens for
training and back from tokens to the exact context substring for predictions.

Bad input: a malformed file, a question without id, text or answers, or non-UTF-8 bytes is a DataError naming
the file and the question's place in it (`data[a].paragraphs[p].qas[q]`). A question or context that is empty
or whitespace only is skipped in the train file and kept (and answered) in dev, counted either way (see
tasks/base.py). A training answer whose `answer_start` misses its text is looked up by text (`realigned_answers`);
one whose text is not in the context at all is left out of training (`unaligned_answers`); both counts are
logged. Questions longer than max_query_length tokens are cut; long contexts are windowed."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ernie_lab.errors import ConfigError, DataError
from ernie_lab.tasks.base import Task

log = logging.getLogger(__name__)


def align_answer(context: str, text: str, start: int) -> int | None:
    """Where the answer really starts: `start` when it points at `text`, else the occurrence of `text` nearest
    to `start` (the earlier one on a tie), or None when the context does not contain it."""
    if not text:
        return None
    if context[start : start + len(text)] == text:
        return start
    found = []
    i = context.find(text)
    while i != -1:
        found.append(i)
        i = context.find(text, i + 1)
    return min(found, key=lambda j: (abs(j - start), j)) if found else None


def read_squad_json(path: Path) -> list[dict]:
    """Questions of a SQuAD-v1-layout file as {"id", "question", "context", "answers", "answer_starts", "where"}
    (`where`: file and place of the question, for messages)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set paths.data_dir or task.data.dir)")
    try:
        root = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    articles = root.get("data") if isinstance(root, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: expected a JSON object with a 'data' list (SQuAD v1 layout)")
    examples = []
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise DataError(f"{where}: missing or non-string 'context'")
            for q, qa in enumerate(paragraph.get("qas", [])):
                qid = qa.get("id")
                question = qa.get("question")
                answers = qa.get("answers")
                if not isinstance(qid, str) or not isinstance(question, str):
                    raise DataError(f"{where}.qas[{q}]: missing or non-string 'id' or 'question'")
                if not isinstance(answers, list) or not answers:
                    raise DataError(f"{where}.qas[{q}] ({qid}): no answers")
                try:
                    texts = [str(ans["text"]) for ans in answers]
                    starts = [int(ans["answer_start"]) for ans in answers]
                except (KeyError, TypeError, ValueError):
                    raise DataError(
                        f"{where}.qas[{q}] ({qid}): every answer needs 'text' and an integer 'answer_start'"
                    ) from None
                examples.append({
                    "id": qid,
                    "where": f"{where}.qas[{q}] ({qid})",
                    "question": question.strip(),
                    "context": context,
                    "answers": texts,
                    "answer_starts": starts,
                })
    return examples


def context_windows(n_tokens: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the context windows: `room` tokens at most, starts `stride` apart, the last
    one reaching the end (PaddleNLP's rule). An empty context still gets one (empty) window."""
    windows = []
    start = 0
    while True:
        end = min(n_tokens, start + room)
        windows.append((start, end))
        if end == n_tokens:
            return windows
        start += min(end - start, stride)


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, candidates: Sequence[int], n_best: int,
              max_length: int) -> tuple[float, int, int] | None:
    """The highest-scoring (start_logit + end_logit) span among the `n_best` best starts and ends within
    `candidates` (token positions allowed to hold the answer), with start <= end and at most `max_length` tokens.
    Ties go to the earlier candidate in logit order."""
    if not len(candidates):
        return None
    positions = np.asarray(candidates)
    starts = positions[np.argsort(-start_logits[positions], kind="stable")[:n_best]]
    ends = positions[np.argsort(-end_logits[positions], kind="stable")[:n_best]]
    best = None
    for s in starts:
        for e in ends:
            if s <= e < s + max_length:
                score = float(start_logits[s] + end_logits[e])
                if best is None or score > best[0]:
                    best = (score, int(s), int(e))
    return best


class Cmrc2018Task(Task):
    name = "cmrc2018"
    output_names = ("start_logits", "end_logits")
    primary_metric = "em"
    per_token_outputs = True
    predictions_suffix = ".json"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.doc_stride = int(cfg.doc_stride)
        self.max_query_length = int(cfg.max_query_length)
        self.n_best_size = int(cfg.n_best_size)
        self.max_answer_length = int(cfg.max_answer_length)
        self.answerless_windows = float(cfg.answerless_windows)
        if self.max_seq_length - self.max_query_length - 3 < 1:
            raise ConfigError(
                f"task.max_seq_length={self.max_seq_length} leaves no room for context after "
                f"task.max_query_length={self.max_query_length} question tokens and 3 special tokens"
            )
        if self.doc_stride < 1 or self.n_best_size < 1 or self.max_answer_length < 1:
            raise ConfigError("task.doc_stride, task.n_best_size and task.max_answer_length must be at least 1")
        #: training answers whose answer_start was wrong but whose text was found nearby / not found at all
        self.realigned_answers = 0
        self.unaligned_answers = 0

    # ---- data -------------------------------------------------------------------------------------------
    def read_local(self, data_dir: Path, split: str) -> list[dict]:
        examples = read_squad_json(data_dir / f"cmrc2018_{split}.json")
        blank = [ex["where"] for ex in examples if not ex["question"].strip() or not ex["context"].strip()]
        if not self.keep_blank(split, blank):
            examples = [ex for ex in examples if ex["question"].strip() and ex["context"].strip()]
        return examples

    def read_online(self, split: str) -> list[dict]:
        from paddlenlp.datasets import load_dataset

        return [
            {
                "id": ex["id"],
                "question": ex["question"],
                "context": ex["context"],
                "answers": list(ex["answers"]),
                "answer_starts": [int(s) for s in ex["answer_starts"]],
            }
            for ex in load_dataset("cmrc2018", splits=split)
        ]

    # ---- features ----------------------------------------------------------------------------------------
    def encode_context(self, context: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the context and, for each token, the [start, end) characters it came from."""
        tokens = self.tokenizer.tokenize(context)
        offsets = self.tokenizer.get_offset_mapping(context) if tokens else []
        if len(offsets) != len(tokens):
            raise RuntimeError(f"tokenizer gave {len(tokens)} tokens but {len(offsets)} offsets for a context")
        return self.tokenizer.convert_tokens_to_ids(tokens), [tuple(o) for o in offsets]

    def featurize(self, examples: list[dict], training: bool) -> list[dict]:
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        encoded: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        if training:
            self.realigned_answers = self.unaligned_answers = 0
        features = []
        # which answerless training windows are kept: the same draw for the same examples on every run
        keep_draw = np.random.default_rng(0)
        for index, ex in enumerate(examples):
            question = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(ex["question"]))
            question = question[: self.max_query_length]
            if ex["context"] not in encoded:
                encoded[ex["context"]] = self.encode_context(ex["context"])
            ids, offsets = encoded[ex["context"]]
            answer = self._answer_token_span(ex, offsets) if training else None
            if training and answer is None:
                continue
            first = len(question) + 2  # position of the first context token
            for start, end in context_windows(len(ids), self.max_seq_length - len(question) - 3, self.doc_stride):
                feature: dict[str, Any] = {
                    "input_ids": [cls_id, *question, sep_id, *ids[start:end], sep_id],
                    "token_type_ids": [0] * first + [1] * (end - start + 1),
                    "example_index": index,
                    "context_start": first,
                    "offsets": offsets[start:end],
                }
                if answer is not None:  # a window without the whole answer points at [CLS]
                    inside = start <= answer[0] and answer[1] < end
                    if not inside and keep_draw.random() >= self.answerless_windows:
                        continue
                    feature["start_position"] = answer[0] - start + first if inside else 0
                    feature["end_position"] = answer[1] - start + first if inside else 0
                features.append(feature)
        if training and (self.realigned_answers or self.unaligned_answers):
            log.warning(
                "cmrc2018: %d training answers had a wrong answer_start and were found by their text; "
                "%d could not be found in their context and were left out",
                self.realigned_answers, self.unaligned_answers,
            )
        return features

    def _answer_token_span(self, ex: dict, offsets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """First and last context tokens of the first answer, after aligning it to its text; counts the answers
        that needed aligning and those that could not be found (or cover no token)."""
        text, given = ex["answers"][0], ex["answer_starts"][0]
        start = align_answer(ex["context"], text, given)
        covering = [] if start is None else [
            i for i, (s, e) in enumerate(offsets) if s < start + len(text) and e > start
        ]
        if not covering:
            self.unaligned_answers += 1
            return None
        if start != given:
            self.realigned_answers += 1
        return covering[0], covering[-1]

    def collate_labels(self, features: Sequence[dict]) -> dict[str, np.ndarray]:
        return {
            "start_positions": np.array([f["start_position"] for f in features], dtype=np.int64),
            "end_positions": np.array([f["end_position"] for f in features], dtype=np.int64),
        }

    # ---- model -------------------------------------------------------------------------------------------
    def model_class(self):
        from paddlenlp.transformers import ErnieForQuestionAnswering

        return ErnieForQuestionAnswering

    def loss(self, outputs, batch):
        import paddle.nn.functional as F

        start_logits, end_logits = outputs
        return (F.cross_entropy(start_logits, batch["start_positions"])
                + F.cross_entropy(end_logits, batch["end_positions"])) / 2

    # ---- predictions and metric ---------------------------------------------------------------------------
    def data_stats(self) -> dict[str, int]:
        return {"realigned_answers": self.realigned_answers, "unaligned_answers": self.unaligned_answers}

    def postprocess(self, examples, features, outputs) -> list[str]:
        """One answer per question: the best span over all its windows, sliced from the original context (outer
        whitespace stripped, which the official evaluator ignores anyway)."""
        best: list[tuple[float, str] | None] = [None] * len(examples)
        for feature, (start_logits, end_logits) in zip(features, outputs):
            first, offsets = feature["context_start"], feature["offsets"]
            span = best_span(start_logits, end_logits, range(first, first + len(offsets)),
                             self.n_best_size, self.max_answer_length)
            index = feature["example_index"]
            if span is not None and (best[index] is None or span[0] > best[index][0]):
                context = examples[index]["context"]
                text = context[offsets[span[1] - first][0] : offsets[span[2] - first][1]]
                best[index] = (span[0], text.strip())  # an [UNK]'s offsets can take in the spaces around it
        return [b[1] if b is not None else "" for b in best]

    def metrics(self, examples, predictions) -> dict[str, float]:
        from ernie_lab.metrics import cmrc_scores

        return cmrc_scores([ex["answers"] for ex in examples], predictions)

    def write_predictions(self, examples, predictions, path: Path) -> None:
        """The official evaluator's input: {question id: answer text}."""
        answers = {ex["id"]: answer for ex, answer in zip(examples, predictions)}
        path.write_text(json.dumps(answers, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
