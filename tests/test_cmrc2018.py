"""CMRC 2018: reading the SQuAD-layout files, offsets from tokens back to characters, answer alignment, context
windows, and n-best span decoding over all windows of a question."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ernie_lab.config import CONF_DIR
from ernie_lab.errors import ConfigError, DataError
from ernie_lab.tasks import build_task
from ernie_lab.tasks.cmrc2018 import Cmrc2018Task, align_answer, best_span, context_windows, read_squad_json
from tests.conftest import RecordingRun, isolated_overrides, make_cfg


def compose_cfg(*overrides: str):
    return make_cfg(["task=cmrc2018", "model=tiny", *overrides])


@pytest.fixture(scope="module")
def cfg():
    return compose_cfg()


@pytest.fixture(scope="module")
def task(cfg, tokenizer) -> Cmrc2018Task:
    return build_task(cfg.task, tokenizer)


@pytest.fixture(scope="module")
def data_dir(cfg) -> Path:
    return Path(cfg.task.data.dir)  # missing data fails the tests that read it, loudly


@pytest.fixture(scope="module")
def train_examples(data_dir) -> dict[str, dict]:
    return {ex["id"]: ex for ex in read_squad_json(data_dir / "cmrc2018_train.json")}


def small_task(tokenizer, *overrides: str) -> Cmrc2018Task:
    """Windows of a handful of tokens, so a short context already needs several."""
    cfg = compose_cfg("task.max_seq_length=16", "task.doc_stride=4", "task.max_query_length=8", *overrides)
    return Cmrc2018Task(cfg.task, tokenizer)


# ---- config --------------------------------------------------------------------------------------------------------

def test_config_mirrors_tnews_keys():
    def keys(node, prefix=""):
        return {prefix + k for k in node} | {
            key for k, v in node.items() if isinstance(v, dict) for key in keys(v, f"{prefix}{k}.")
        }

    tnews_file = yaml.safe_load((CONF_DIR / "task" / "tnews.yaml").read_text())
    ours_file = yaml.safe_load((CONF_DIR / "task" / "cmrc2018.yaml").read_text())
    # each task file sets its task.* and the train.* keys fine-tuning reads
    assert set(ours_file) == set(tnews_file) == {"task", "train"} and set(ours_file["train"]) == set(tnews_file["train"])
    tnews, ours = tnews_file["task"], ours_file["task"]
    assert keys(ours) - keys(tnews) == {"doc_stride", "max_query_length", "n_best_size", "max_answer_length",
                                        "answerless_windows"}
    assert keys(tnews) <= keys(ours)
    assert ours["data"]["eval_split"] == "dev" and ours["selection_split"] == "eval"
    defaults = [ours[k] for k in ("max_seq_length", "doc_stride", "n_best_size", "max_answer_length")]
    assert defaults == [512, 128, 20, 50]


def test_no_room_for_context_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="no room for context"):
        Cmrc2018Task(compose_cfg("task.max_seq_length=60").task, tokenizer)


# ---- reading -------------------------------------------------------------------------------------------------------

def test_reads_the_real_files(data_dir, train_examples):
    dev = read_squad_json(data_dir / "cmrc2018_dev.json")
    assert len(train_examples) == 10142 and len(dev) == 3219
    assert all(len(ex["answers"]) == 3 == len(ex["answer_starts"]) for ex in dev)
    first = train_examples["TRAIN_186_QUERY_0"]
    assert first["question"] == "范廷颂是什么时候被任为主教的？"
    assert first["answers"] == ["1963年"] and first["answer_starts"] == [30]
    assert first["context"][30:35] == "1963年"


def test_official_offsets_that_miss_their_answer(data_dir, train_examples):
    # the data: 21 train and 200 dev answers have an answer_start that does not point at their text
    def wrong(examples):
        return [(ex, t, s) for ex in examples for t, s in zip(ex["answers"], ex["answer_starts"])
                if ex["context"][s : s + len(t)] != t]

    train_wrong = wrong(train_examples.values())
    dev_wrong = wrong(read_squad_json(data_dir / "cmrc2018_dev.json"))
    assert (len(train_wrong), len(dev_wrong)) == (21, 200)
    assert all(align_answer(ex["context"], t, s) is not None for ex, t, s in train_wrong)  # all found by text
    assert sum(align_answer(ex["context"], t, s) is None for ex, t, s in dev_wrong) == 193


@pytest.mark.parametrize(("content", "message"), [
    ('{"data": [{"paragraphs": [{"context": "abc",\n "qas": [}]}]}', r":2: malformed JSON"),
    ('{"version": "v1.0"}', "expected a JSON object with a 'data' list"),
    ('{"data": [{"paragraphs": [{"context": "甲乙", "qas": [{"id": "q1", "question": "?", "answers": []}]}]}]}',
     r"data\[0\]\.paragraphs\[0\]\.qas\[0\] \(q1\): no answers"),
    ('{"data": [{"paragraphs": [{"context": "甲乙",'
     ' "qas": [{"id": "q1", "question": "?", "answers": [{"text": "甲"}]}]}]}]}',
     "needs 'text' and an integer 'answer_start'"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "missing or non-string 'context'"),
])
def test_malformed_files_are_data_errors(tmp_path, content, message):
    path = tmp_path / "cmrc2018_train.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        read_squad_json(path)
    assert str(path) in str(err.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "cmrc2018_dev.json"
    path.write_bytes('{"data": "中"}'.encode("gbk"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_squad_json(path)


# ---- offsets -------------------------------------------------------------------------------------------------------

def encoded(task: Cmrc2018Task, text: str) -> list[tuple[str, tuple[int, int]]]:
    ids, offsets = task.encode_context(text)
    return list(zip(task.tokenizer.convert_ids_to_tokens(ids), offsets))


def test_offsets_of_chinese_with_digits_and_latin_letters(task):
    text = "2015年iPhone 6s售价5,288元。"
    assert encoded(task, text) == [
        ("2015", (0, 4)), ("年", (4, 5)), ("iphone", (5, 11)), ("6s", (12, 14)), ("售", (14, 15)), ("价", (15, 16)),
        ("5", (16, 17)), (",", (17, 18)), ("288", (18, 21)), ("元", (21, 22)), ("。", (22, 23)),
    ]
    # every token is its lower-cased characters; the space at 11 belongs to no token
    assert all(text[s:e].lower() == token for token, (s, e) in encoded(task, text))


def test_offsets_of_word_pieces(task):
    assert encoded(task, "GPT-4o发布于2024年") == [
        ("gpt", (0, 3)), ("-", (3, 4)), ("4", (4, 5)), ("##o", (5, 6)), ("发", (6, 7)), ("布", (7, 8)),
        ("于", (8, 9)), ("202", (9, 12)), ("##4", (12, 13)), ("年", (13, 14)),
    ]


def test_offsets_around_whitespace_and_unknown_characters(task):
    # runs of spaces and the ideographic space U+3000 fall between tokens
    assert encoded(task, "Hello  world\u3000！") == [("hello", (0, 5)), ("world", (7, 12)), ("！", (13, 14))]
    # a zero-width space (1) makes no token; U+9FFF is not in the vocabulary: its [UNK] starts on it (2) but its
    # end reaches the next token's start, taking in the space (3); é is lower-cased and stripped to "e"
    assert encoded(task, "x\u200b\u9fff é") == [("x", (0, 1)), ("[UNK]", (2, 4)), ("e", (4, 5))]
    # consecutive [UNK]s each get their own character
    assert encoded(task, "\u9fff\u9fff中") == [("[UNK]", (0, 1)), ("[UNK]", (1, 2)), ("中", (2, 3))]
    assert task.encode_context("") == ([], [])


# ---- answer alignment ----------------------------------------------------------------------------------------------

def test_align_answer_on_real_training_examples(train_examples):
    ex = train_examples["TRAIN_876_QUERY_0"]  # official answer_start 342 is one character late
    assert (ex["answers"][0], ex["answer_starts"][0]) == ("跳海", 342)
    assert align_answer(ex["context"], "跳海", 342) == 341
    ex = train_examples["TRAIN_2283_QUERY_1"]  # "日本" occurs at 226 and 260; 226 is nearest to the given 227
    assert align_answer(ex["context"], ex["answers"][0], ex["answer_starts"][0]) == 226
    ex = train_examples["TRAIN_186_QUERY_0"]  # a correct offset stays
    assert align_answer(ex["context"], "1963年", 30) == 30


def test_align_answer_rules():
    assert align_answer("甲乙丙甲乙", "甲乙", 2) == 3  # |3-2| = 1 beats |0-2| = 2
    assert align_answer("甲乙丙丁甲乙", "甲乙", 2) == 0  # a tie (2 and 2) goes to the earlier one
    assert align_answer("甲乙丙", "丁", 0) is None
    assert align_answer("甲乙丙", "", 0) is None


def test_training_features_use_aligned_answers(task, train_examples):
    ids = [f"TRAIN_876_QUERY_{i}" for i in range(3)] + ["TRAIN_2283_QUERY_1", "TRAIN_186_QUERY_0"]
    examples = [train_examples[i] for i in ids]
    examples.append({**examples[-1], "id": "made_up", "answers": ["不在文中的答案"], "answer_starts": [3]})
    features = task.featurize(examples, training=True)
    # 876_0, 876_2 and 2283_1 have a wrong official offset; the made-up answer is not in its context
    assert (task.realigned_answers, task.unaligned_answers) == (3, 1)
    assert {f["example_index"] for f in features} == set(range(5))  # the unaligned one has no feature
    holding = [f for f in features if f["start_position"] > 0]
    assert {f["example_index"] for f in holding} == set(range(5))  # some window of each question holds its answer
    for f in holding:
        assert len(f["input_ids"]) <= 512 and len(f["token_type_ids"]) == len(f["input_ids"])
        ex = examples[f["example_index"]]
        first, offsets = f["context_start"], f["offsets"]
        text = ex["context"][offsets[f["start_position"] - first][0] : offsets[f["end_position"] - first][1]]
        assert text == ex["answers"][0]
    batch = task.collate(features, with_labels=True)
    assert batch["start_positions"].tolist() == [f["start_position"] for f in features]


def test_windows_without_the_answer_point_at_cls(tokenizer):
    task = small_task(tokenizer)
    context = "甲乙丙丁戊己庚辛壬癸" * 4  # 40 characters, one token each
    example = {"id": "q", "question": "问题", "context": context, "answers": ["庚辛壬"], "answer_starts": [36]}
    features = task.featurize([example], training=True)
    # room = 16 - 2 question tokens - 3 specials = 11 tokens; windows start 4 apart: 0, 4, ..., 28 (ends at 39),
    # then 32 (ends at 40). The answer (tokens 36-38) is inside the windows starting at 28 and 32 only.
    starts = [f["offsets"][0][0] for f in features]
    assert starts == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    for f, start in zip(features, starts):
        if start in (28, 32):
            assert (f["start_position"], f["end_position"]) == (36 - start + 4, 38 - start + 4)
        else:
            assert (f["start_position"], f["end_position"]) == (0, 0)
        assert f["token_type_ids"] == [0] * 4 + [1] * (len(f["input_ids"]) - 4)


def test_answerless_windows_share_thins_training_windows_but_never_evaluation(tokenizer):
    context = "甲乙丙丁戊己庚辛壬癸" * 4
    examples = [{"id": f"q{k}", "question": "问题", "context": context, "answers": ["庚辛壬"], "answer_starts": [36]}
                for k in range(20)]  # 9 windows each, 2 of them holding the answer

    def windows(share: float, training: bool = True):
        return small_task(tokenizer, f"task.answerless_windows={share}").featurize(examples, training=training)

    answerless = lambda fs: sum(f["start_position"] == 0 for f in fs)  # noqa: E731
    assert len(windows(1.0)) == 180 and answerless(windows(1.0)) == 140  # all kept, as the seed trains
    assert len(windows(0.0)) == 40 and answerless(windows(0.0)) == 0  # every answer window kept
    half = windows(0.5)
    assert len(half) - answerless(half) == 40 and 40 < answerless(half) < 100
    assert [f["offsets"] for f in windows(0.5)] == [f["offsets"] for f in half]  # the same draw on every run
    assert len(windows(0.0, training=False)) == 180  # evaluation reads every window


def test_answerless_windows_share_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="task.answerless_windows"):
        from ernie_lab.schema import validate
        validate(compose_cfg("task.answerless_windows=1.5"))


# ---- windows and span decoding -------------------------------------------------------------------------------------

def test_context_windows_follow_paddlenlp():
    assert context_windows(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]  # starts step by the stride...
    assert context_windows(10, 4, 6) == [(0, 4), (4, 8), (8, 10)]  # ...but never skip a token
    assert context_windows(3, 4, 2) == [(0, 3)]
    assert context_windows(0, 4, 2) == [(0, 0)]
    for n in range(1, 60):
        for room, stride in [(5, 2), (7, 7), (9, 4)]:
            windows = context_windows(n, room, stride)
            covered = sorted({i for s, e in windows for i in range(s, e)})
            assert covered == list(range(n)) and windows[-1][1] == n
            assert all(e - s <= room for s, e in windows)


def planted(features: list[dict], spans: dict[int, tuple[int, int]], windows: dict[int, set[int]]) -> list:
    """Zero logits everywhere but: a start/end of 5 at the planted span (char offsets) in the chosen windows of each
    question, and 9 on every question token and [CLS], which decoding must ignore."""
    outputs, seen = [], {}
    for f in features:
        k = f["example_index"]
        w = seen[k] = seen.get(k, -1) + 1
        start_logits = np.zeros(len(f["input_ids"]), dtype=np.float32)
        end_logits = np.zeros(len(f["input_ids"]), dtype=np.float32)
        start_logits[: f["context_start"]] = end_logits[: f["context_start"]] = 9.0
        if w in windows[k]:
            s, e = spans[k]
            positions = {o: f["context_start"] + i for i, o in enumerate(f["offsets"])}
            start_logits[positions[(s, s + 1)]] = 5.0
            end_logits[positions[(e - 1, e)]] = 5.0
        outputs.append((start_logits, end_logits))
    return outputs


def test_planted_spans_are_recovered_exactly(tokenizer):
    task = small_task(tokenizer)
    context = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉"  # 20 characters, one token each
    examples = [{"id": f"q{k}", "question": "问题", "context": context, "answers": ["x"], "answer_starts": [0]}
                for k in range(4)]
    features = task.featurize(examples, training=False)
    # 11 context tokens a window, starts 4 apart: windows 0-10, 4-14, 8-18, 12-19
    assert [(f["offsets"][0][0], f["offsets"][-1][1]) for f in features[:4]] == [(0, 11), (4, 15), (8, 19), (12, 20)]
    spans = {
        0: (8, 11),  # ends on the last context token of window 0 (just before its [SEP])
        1: (8, 11),  # the same span, planted only in window 2, where it starts on the first context token
        2: (15, 18),  # only windows 2 and 3 hold it; planted in window 3
        3: (0, 1),  # the very first context character
    }
    windows = {0: {0}, 1: {2}, 2: {3}, 3: {0}}
    predictions = task.postprocess(examples, features, planted(features, spans, windows))
    assert predictions == [context[s:e] for s, e in spans.values()] == ["壬癸子", "壬癸子", "巳午未", "甲"]


def test_best_span_rules():
    start = np.array([0, 9, 1, 0, 0, 0], dtype=np.float32)
    end = np.array([0, 0, 0, 0, 9, 2], dtype=np.float32)
    # (1, 4) scores 18 but is 4 tokens long; with max_length 3 the best allowed is (2, 4): 1 + 9
    assert best_span(start, end, range(1, 6), n_best=20, max_length=3) == (10.0, 2, 4)
    assert best_span(start, end, range(1, 6), n_best=20, max_length=4) == (18.0, 1, 4)
    # an end before the start is never taken: the best end (4) lies before start 5, so (5, 5) wins
    assert best_span(start, end, range(5, 6), n_best=20, max_length=3) == (2.0, 5, 5)
    # only the n best starts and ends are paired: with n_best 1, start 1 and end 4 are all there is
    assert best_span(start, end, range(1, 6), n_best=1, max_length=3) is None
    assert best_span(start, end, [], n_best=20, max_length=3) is None


def test_an_empty_context_still_gets_an_answer(tokenizer):
    task = small_task(tokenizer)
    examples = [{"id": "q", "question": "问题", "context": "", "answers": ["甲"], "answer_starts": [0]}]
    features = task.featurize(examples, training=False)
    assert len(features) == 1 and features[0]["offsets"] == []
    outputs = [(np.zeros(len(features[0]["input_ids"])), np.zeros(len(features[0]["input_ids"])))]
    assert task.postprocess(examples, features, outputs) == [""]


# ---- loss, metric and predictions file -----------------------------------------------------------------------------

def test_loss_is_the_mean_of_start_and_end_cross_entropy(task):
    import paddle

    rng = np.random.default_rng(0)
    start, end = rng.standard_normal((2, 2, 7)).astype(np.float32)
    labels = {"start_positions": paddle.to_tensor([1, 0]), "end_positions": paddle.to_tensor([3, 0])}
    loss = float(task.loss((paddle.to_tensor(start), paddle.to_tensor(end)), labels))

    def ce(logits, gold):
        return np.mean([np.log(np.exp(row).sum()) - row[g] for row, g in zip(logits, gold)])

    assert loss == pytest.approx((ce(start, [1, 0]) + ce(end, [3, 0])) / 2, rel=1e-5)


def test_metrics_and_official_predictions_file(task, tmp_path):
    examples = [
        {"id": "DEV_0_QUERY_0", "answers": ["光荣和ω-force"] * 3},
        {"id": "DEV_0_QUERY_1", "answers": ["光荣和ω-force"]},
    ]
    predictions = ["光荣和ω－force", "光荣"]
    assert task.metrics(examples, predictions) == pytest.approx({"em": 50.0, "f1": 250 / 3})
    path = tmp_path / "pred.json"
    task.write_predictions(examples, predictions, path)
    expected = {"DEV_0_QUERY_0": "光荣和ω－force", "DEV_0_QUERY_1": "光荣"}
    assert json.loads(path.read_text(encoding="utf-8")) == expected


def test_dev_features_fit_the_model(data_dir, tokenizer):
    task = Cmrc2018Task(compose_cfg("task.data.limit.eval=30").task, tokenizer)
    examples = task.load("eval")
    features = task.featurize(examples, training=False)
    assert len(examples) == 30 and len(features) >= 30
    assert {f["example_index"] for f in features} == set(range(30))
    assert max(len(f["input_ids"]) for f in features) <= 512
    assert all("start_position" not in f for f in features)



@pytest.mark.slow
def test_tiny_model_trains_end_to_end(data_dir, tokenizer, tmp_path):
    from ernie_lab.training import finetune

    cfg = compose_cfg(
        *isolated_overrides(tmp_path), "task.max_seq_length=128", "task.data.limit.train=32",
        "task.data.limit.eval=16", "train.epochs=2", "train.batch_size=16", "train.learning_rate=3e-3",
        "train.log_every_steps=1",
    )
    run = RecordingRun()
    result = finetune(cfg, run)
    assert run.params["data.train_examples"] == 32 and run.params["data.selection_examples"] == 16
    assert run.params["data.train_features"] > 32  # 128-token windows: most contexts need several
    assert result["loss_last"] < result["loss_first"]
    assert set(result["scores"]) == {"em", "f1"}
    assert all(0.0 <= v <= 100.0 for v in result["scores"].values())
    assert (Path(result["checkpoint"]) / "training_state.json").is_file()
