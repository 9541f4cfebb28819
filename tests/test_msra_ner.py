"""MSRA NER: reading the character/tag files, one token per character, windows over long sentences, and the
merge of window predictions back onto characters."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from ernie_lab.config import CONF_DIR
from ernie_lab.errors import ConfigError, DataError
from ernie_lab.metrics import tag_entities
from ernie_lab.tasks import build_task
from ernie_lab.tasks.msra_ner import (IGNORE_INDEX, LABELS, MsraNerTask, Window, decode_bio, log_softmax, plan_windows,
                                      read_char_tags, repair_lone_inside)
from tests.conftest import RecordingRun, isolated_overrides, make_cfg


def compose_cfg(*overrides: str):
    return make_cfg(["task=msra_ner", "model=tiny", *overrides])


@pytest.fixture(scope="module")
def cfg():
    return compose_cfg()


@pytest.fixture(scope="module")
def task(cfg, tokenizer) -> MsraNerTask:
    return build_task(cfg.task, tokenizer)


@pytest.fixture(scope="module")
def data_dir(cfg) -> Path:
    return Path(cfg.task.data.dir)  # missing data fails the tests that read it, loudly


def planted_outputs(features: list[dict], gold: list[list[str]]) -> list[tuple[np.ndarray]]:
    """Logits whose argmax is the gold tag where a window owns the character and a wrong tag everywhere else,
    so a merge that used any non-owning window would show up as an error."""
    outputs = []
    for feature in features:
        win = Window(*feature["window"])
        tags = gold[feature["example_index"]]
        logits = np.zeros((len(feature["input_ids"]), len(LABELS)), dtype=np.float32)
        for i in range(win.start, win.end):
            right = LABELS.index(tags[i])
            logits[i - win.start + 1, right if win.own_start <= i < win.own_end else (right + 1) % len(LABELS)] = 5.0
        outputs.append((logits,))
    return outputs


# ---- config --------------------------------------------------------------------------------------------------------

def test_config_mirrors_tnews_keys():
    def keys(node, prefix=""):
        return {prefix + k for k in node} | {
            key for k, v in node.items() if isinstance(v, dict) for key in keys(v, f"{prefix}{k}.")
        }

    tnews_file = yaml.safe_load((CONF_DIR / "task" / "tnews.yaml").read_text())
    ours_file = yaml.safe_load((CONF_DIR / "task" / "msra_ner.yaml").read_text())
    # each task file sets its task.* and the train.* keys fine-tuning reads
    assert set(ours_file) == set(tnews_file) == {"task", "train"} and set(ours_file["train"]) == set(tnews_file["train"])
    tnews, ours = tnews_file["task"], ours_file["task"]
    assert keys(ours) - keys(tnews) == {"doc_stride"}
    assert keys(tnews) <= keys(ours)
    assert ours["data"]["eval_split"] == "test" and ours["selection_split"] == "heldout"


def test_bad_stride_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="doc_stride"):
        MsraNerTask(compose_cfg("task.doc_stride=0").task, tokenizer)


# ---- reading -------------------------------------------------------------------------------------------------------

def test_reads_a_prefix_of_the_train_file(data_dir, tmp_path):
    with (data_dir / "train.txt").open(encoding="utf-8") as fh:
        head = [next(fh) for _ in range(299)]
    path = tmp_path / "train.txt"
    path.write_text("".join(head), encoding="utf-8")
    examples = read_char_tags(path)
    # counted with awk on the same 299 lines: 5 blank lines, 294 character lines, B- tags 10 LOC and 1 ORG
    assert len(examples) == 5
    assert sum(len(ex["chars"]) for ex in examples) == 294
    assert Counter(t for ex in examples for t, _, _ in tag_entities(ex["tags"])) == {"LOC": 10, "ORG": 1}
    assert examples[0]["id"] == 0 and all(len(ex["chars"]) == len(ex["tags"]) for ex in examples)


def test_reads_the_whole_test_split(data_dir):
    examples = read_char_tags(data_dir / "test.txt")
    # the canonical test file: 3,442 sentences, 172,601 characters; its B- tags are 2,886 LOC, 1,973 PER and
    # 1,331 ORG, and it has no I- tag without a B-, so those are its entities
    assert len(examples) == 3442
    assert sum(len(ex["chars"]) for ex in examples) == 172601
    assert Counter(t for ex in examples for t, _, _ in tag_entities(ex["tags"])) == {
        "LOC": 2886, "PER": 1973, "ORG": 1331,
    }
    assert max(len(ex["chars"]) for ex in examples) == 2427  # far longer than one window


@pytest.mark.parametrize(("content", "line", "message"), [
    ("中\tO\n国\tO\t多\n", 2, "expected 2 tab-separated columns"),
    ("中\tO\n\n国\n", 3, "expected 2 tab-separated columns"),
    ("中\tO\n国\tB-XYZ\n", 2, "unknown tag 'B-XYZ'"),
    ("中\to\n", 1, "unknown tag 'o'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        read_char_tags(path)
    assert f"{path}:{line}:" in str(err.value)


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("中\tO\n\n".encode("utf-8") + "国\tO\n".encode("gbk"))
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        read_char_tags(path)
    assert f"{path}:3:" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_char_tags(tmp_path / "nope.txt")


def test_crlf_and_trailing_sentence_without_blank_line(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("中\tB-LOC\r\n国\tI-LOC\r\n\r\n\r\n人\tO".encode("utf-8"))
    assert read_char_tags(path) == [
        {"id": 0, "chars": ["中", "国"], "tags": ["B-LOC", "I-LOC"]},
        {"id": 1, "chars": ["人"], "tags": ["O"]},
    ]


# ---- one token per character ---------------------------------------------------------------------------------------

def test_every_character_is_exactly_one_token(task, tokenizer):
    unk = tokenizer.convert_tokens_to_ids(tokenizer.unk_token)
    assert tokenizer.tokenize("\u200b") == [] and tokenizer.tokenize(" ") == []
    assert task.char_id("\u200b") == unk  # tokenizes to nothing
    assert task.char_id(" ") == unk
    assert len(tokenizer.tokenize("\U0001d15e")) == 2  # a musical symbol that decomposes into two pieces
    assert task.char_id("\U0001d15e") == tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\U0001d15e")[0])
    assert task.char_id("A") == tokenizer.convert_tokens_to_ids("a")  # the vocabulary is lower case
    assert task.char_id("中") == tokenizer.convert_tokens_to_ids("中")

    chars = list("2015年iPhone\u200b 售价")
    features = task.featurize([{"id": 0, "chars": chars, "tags": ["O"] * len(chars)}], training=False)
    assert len(features) == 1
    assert len(features[0]["input_ids"]) == len(chars) + 2
    assert features[0]["input_ids"][0] == tokenizer.cls_token_id
    assert features[0]["input_ids"][-1] == tokenizer.sep_token_id
    assert features[0]["labels"] == [IGNORE_INDEX] + [0] * len(chars) + [IGNORE_INDEX]


# ---- windows -------------------------------------------------------------------------------------------------------

def brute_force_owner(length: int, window: int, stride: int) -> list[int]:
    """The rule spelled out: each character goes to the window where it is furthest from an edge (earliest on a tie)."""
    plan = plan_windows(length, window, stride)
    owners = []
    for i in range(length):
        margins = [min(i - w.start, w.end - 1 - i) if w.start <= i < w.end else -1 for w in plan]
        owners.append(margins.index(max(margins)))
    return owners


@pytest.mark.parametrize(("window", "stride"), [(126, 64), (126, 126), (8, 3), (5, 1), (7, 7), (10, 4)])
def test_windows_cover_every_character_once(window, stride):
    for length in range(0, 300):
        plan = plan_windows(length, window, stride)
        owned = [i for w in plan for i in range(w.own_start, w.own_end)]
        assert owned == list(range(length))  # each character once, in order
        assert plan[0].start == 0 and plan[-1].end == length
        assert all(w.end - w.start <= window and w.start <= w.own_start <= w.own_end <= w.end for w in plan)
        assert all(b.start - a.start <= stride for a, b in zip(plan, plan[1:]))
        owners = brute_force_owner(length, window, stride)
        assert [w for w, p in enumerate(plan) for _ in range(p.own_start, p.own_end)] == owners


def test_long_sentence_windows_by_hand():
    # 300 characters, windows of 126 starting 64 apart: starts 0, 64, 128 and the last at 300 - 126 = 174.
    # Centres are 62.5, 126.5, 190.5, 236.5; ownership changes at the midpoints 94.5, 158.5, 213.5.
    assert plan_windows(300, 126, 64) == [
        Window(0, 126, 0, 95), Window(64, 190, 95, 159), Window(128, 254, 159, 214), Window(174, 300, 214, 300),
    ]


@pytest.mark.parametrize("overrides", [(), ("task.max_seq_length=10", "task.doc_stride=3")])
def test_planted_logits_come_back_as_the_gold_tags(tokenizer, overrides):
    task = MsraNerTask(compose_cfg(*overrides).task, tokenizer)
    rng = np.random.default_rng(3)
    lengths = [5, task.window, task.window + 1, 3 * task.window + 17, 4 * task.window]
    examples = [
        {"id": k, "chars": list(rng.choice(list("中国人民北京上海"), size=n)),
         "tags": valid_bio(list(rng.choice(LABELS, size=n)))}
        for k, n in enumerate(lengths)
    ]
    features = task.featurize(examples, training=False)
    assert max(len(f["input_ids"]) for f in features) <= task.max_seq_length
    assert sum(f["example_index"] == 3 for f in features) > 3  # the long sentence needs more than 3 windows
    predictions = task.postprocess(examples, features, planted_outputs(features, [ex["tags"] for ex in examples]))
    assert predictions == [ex["tags"] for ex in examples]
    assert task.metrics(examples, predictions)["f1"] == 100.0


def valid_bio(tags: list[str]) -> list[str]:
    repair_lone_inside(tags)
    return tags


def is_valid_bio(tags) -> bool:
    return all(not t.startswith("I-") or (i and tags[i - 1][2:] == t[2:]) for i, t in enumerate(tags))


def test_decoding_joins_a_fragment_that_argmax_leaves():
    # argmax reads O I-PER I-PER (seqeval: a PER entity without its first character); the constrained path
    # keeps the whole name, since O cannot precede I-PER
    probs = np.full((3, len(LABELS)), 0.01)
    probs[0, [LABELS.index("O"), LABELS.index("B-PER")]] = 0.5, 0.4
    probs[1:, LABELS.index("I-PER")] = 0.9
    log_probs = np.log(probs / probs.sum(axis=1, keepdims=True))
    assert [LABELS[i] for i in log_probs.argmax(axis=1)] == ["O", "I-PER", "I-PER"]
    assert [LABELS[i] for i in decode_bio(log_probs)] == ["B-PER", "I-PER", "I-PER"]


def test_decoding_finds_the_best_valid_sequence():
    # against every one of the 7^4 sequences of four tags, on random scores
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(len(LABELS))] * 4, indexing="ij"), axis=-1).reshape(-1, 4)
    valid = grid[[is_valid_bio([LABELS[i] for i in row]) for row in grid]]
    for _ in range(50):
        log_probs = log_softmax(rng.normal(scale=3.0, size=(4, len(LABELS))))
        best = valid[np.argmax(log_probs[np.arange(4), valid].sum(axis=1))]
        assert decode_bio(log_probs) == best.tolist()
    single = log_softmax(rng.normal(size=(1, len(LABELS))))
    assert LABELS[decode_bio(single)[0]] in [t for t in LABELS if not t.startswith("I-")]


def test_training_features_skip_empty_sentences_and_label_every_window(task):
    examples = [{"id": 0, "chars": [], "tags": []}, {"id": 1, "chars": ["中"] * 200, "tags": ["O"] * 200}]
    features = task.featurize(examples, training=True)
    assert {f["example_index"] for f in features} == {1}
    assert all(f["labels"][1:-1] == [0] * (len(f["input_ids"]) - 2) for f in features)


def test_collate_pads_labels_with_the_ignore_index(task):
    features = task.featurize([
        {"id": 0, "chars": list("中国"), "tags": ["B-LOC", "I-LOC"]},
        {"id": 1, "chars": list("人"), "tags": ["O"]},
    ], training=True)
    batch = task.collate(features, with_labels=True)
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, 0, -100, -100]]
    assert batch["input_ids"].shape == (2, 4)


def test_loss_ignores_special_and_padding_positions(task):
    import paddle

    labels = np.array([[-100, 1, 2, -100], [-100, 0, -100, -100]])
    logits = np.random.default_rng(0).standard_normal((2, 4, len(LABELS))).astype(np.float32)
    loss = float(task.loss(paddle.to_tensor(logits), {"labels": paddle.to_tensor(labels)}))
    picked = [(0, 1, 1), (0, 2, 2), (1, 1, 0)]
    expected = np.mean([np.log(np.exp(logits[b, t]).sum()) - logits[b, t, y] for b, t, y in picked])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_predictions_file(task, tmp_path):
    examples = [{"id": 0, "chars": list("北京"), "tags": ["B-LOC", "I-LOC"]}]
    path = tmp_path / "pred.jsonl"
    task.write_predictions(examples, [["B-LOC", "O"]], path)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"id": 0, "chars": ["北", "京"], "gold_tags": ["B-LOC", "I-LOC"], "predicted_tags": ["B-LOC", "O"]},
    ]
    assert '"北"' in path.read_text(encoding="utf-8")  # characters are written as themselves, not \u escapes


def test_task_load_carves_the_heldout_slice(data_dir, tokenizer):
    task = MsraNerTask(compose_cfg("task.data.limit.eval=50").task, tokenizer)
    evaluation = task.load("eval")
    assert len(evaluation) == 50 and evaluation[0]["id"] == 0
    assert task.metrics(evaluation, [ex["tags"] for ex in evaluation])["f1"] == 100.0



@pytest.mark.slow
def test_tiny_model_trains_end_to_end(data_dir, tokenizer, tmp_path):
    from ernie_lab.training import finetune

    cfg = compose_cfg(
        *isolated_overrides(tmp_path), "task.data.limit.train=96", "task.data.limit.heldout=16",
        "train.epochs=2", "train.batch_size=16", "train.learning_rate=3e-3", "train.log_every_steps=1",
    )
    run = RecordingRun()
    result = finetune(cfg, run)
    assert run.params["data.train_examples"] == 96 and run.params["data.selection_examples"] == 16
    assert result["loss_last"] < result["loss_first"]  # 12 steps are enough to learn that most tags are O
    assert set(result["scores"]) == {"precision", "recall", "f1", "f1_PER", "f1_ORG", "f1_LOC"}
    assert all(0.0 <= v <= 100.0 for v in result["scores"].values())
    assert (Path(result["checkpoint"]) / "training_state.json").is_file()
