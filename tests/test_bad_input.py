"""Bad input, on purpose: every case is an error naming file, line and value, or is handled by a documented
policy (skipped or kept, and counted; repaired; truncated or windowed), and nothing ends in a stack trace from
deep inside paddle. Test data is written into temporary directories in the layout of ../shared/data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ernie_lab import artifacts
from ernie_lab.errors import ConfigError, DataError, MissingArtifactError
from ernie_lab.metrics import entity_f1
from ernie_lab.modeling import build_model, build_tokenizer, load_finetuned
from ernie_lab.tasks import build_task
from ernie_lab.tasks.msra_ner import LABELS, Window
from tests.conftest import DATA_DIR, RecordingRun, isolated_overrides, make_cfg, run_script

TNEWS_LABELS = [{"label": "100", "label_desc": "news_story"}, {"label": "101", "label_desc": "news_culture"},
                {"label": "102", "label_desc": "news_entertainment"}]


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def tnews_dir(tmp_path, train: str = "", dev: str = "", labels: str | None = None):
    data = tmp_path / "tnews"
    data.mkdir()
    (data / "labels.json").write_text(labels if labels is not None else lines(*TNEWS_LABELS), encoding="utf-8")
    (data / "train.json").write_text(train, encoding="utf-8")
    (data / "dev.json").write_text(dev, encoding="utf-8")
    return data


def task_for(name: str, data_dir, tokenizer, *overrides):
    cfg = make_cfg(["model=tiny", f"task={name}", f"task.data.dir={data_dir}", *overrides])
    return build_task(cfg.task, tokenizer)


def squad(*qas, context="北京是中国的首都。"):
    return json.dumps({"data": [{"paragraphs": [{"context": context, "qas": list(qas)}]}]}, ensure_ascii=False)


def qa(qid, question, text="北京", start=0):
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


# ---- empty and whitespace-only texts: skipped (train file) or kept (eval split), counted, lines named ----------

def test_blank_tnews_sentences(tmp_path, tokenizer, caplog):
    rows = [{"label": "100", "sentence": "好看"}, {"label": "101", "sentence": ""},
            {"label": "102", "sentence": " \u3000\t"}, {"label": "100", "sentence": "新闻"}]
    data = tnews_dir(tmp_path, train=lines(*rows), dev=lines(*rows))
    task = task_for("tnews", data, tokenizer)
    assert [ex["text"] for ex in task.read_split("train")] == ["好看", "新闻"]
    assert task.read_counts["train_blank_texts_skipped"] == 2
    assert f"{data / 'train.json'}:2, {data / 'train.json'}:3" in caplog.text
    dev = task.read_split("dev")
    assert len(dev) == 4 and task.read_counts["dev_blank_texts_kept"] == 2
    features = task.featurize(dev, training=False)  # a blank sentence is [CLS] [SEP]: still predicted
    assert [len(f["input_ids"]) for f in features][1:3] == [2, 2]


def test_blank_msra_sentences(tmp_path, tokenizer):
    data = tmp_path / "msra_ner"
    data.mkdir()
    content = "中\tB-LOC\n国\tI-LOC\n\n \tO\n\u3000\tO\n\n人\tO\n"
    for split in ("train", "test"):
        (data / f"{split}.txt").write_text(content, encoding="utf-8")
    task = task_for("msra_ner", data, tokenizer)
    assert [ex["chars"] for ex in task.read_split("train")] == [["中", "国"], ["人"]]
    assert task.read_counts["train_blank_texts_skipped"] == 1
    test = task.read_split("test")
    assert len(test) == 3 and task.read_counts["test_blank_texts_kept"] == 1
    features = task.featurize(test, training=False)
    outputs = [(np.zeros((len(f["input_ids"]), len(LABELS)), dtype=np.float32),) for f in features]
    assert task.postprocess(test, features, outputs)[1] == ["O", "O"]  # whitespace characters get a tag too


def test_blank_cmrc_questions_and_contexts(tmp_path, tokenizer):
    data = tmp_path / "cmrc2018"
    data.mkdir()
    content = json.dumps({"data": [{"paragraphs": [
        {"context": "北京是中国的首都。", "qas": [qa("good", "首都是哪里？"), qa("no-question", "  ")]},
        {"context": " \n ", "qas": [qa("no-context", "首都是哪里？")]},
    ]}]}, ensure_ascii=False)
    for split in ("train", "dev"):
        (data / f"cmrc2018_{split}.json").write_text(content, encoding="utf-8")
    task = task_for("cmrc2018", data, tokenizer, "task.max_seq_length=64", "task.max_query_length=16")
    assert [ex["id"] for ex in task.read_split("train")] == ["good"]
    assert task.read_counts["train_blank_texts_skipped"] == 2
    dev = task.read_split("dev")
    assert [ex["id"] for ex in dev] == ["good", "no-question", "no-context"]
    features = task.featurize(dev, training=False)
    outputs = [(np.zeros(len(f["input_ids"])), np.zeros(len(f["input_ids"]))) for f in features]
    assert len(task.postprocess(dev, features, outputs)) == 3  # every dev question gets an answer (maybe "")


# ---- over-long texts: truncated or windowed, and the model takes every feature ----------------------------------

def test_over_long_texts_fit_the_model_and_every_msra_character_is_predicted(tmp_path, tokenizer):
    from ernie_lab.training import predict_dygraph

    long_text = "今天北京的天气很好，我们去公园散步。" * 120  # over 2000 characters
    tnews = task_for("tnews", tnews_dir(tmp_path, dev=lines({"label": "100", "sentence": long_text})), tokenizer)
    msra = task_for("msra_ner", tmp_path, tokenizer)
    cmrc = task_for("cmrc2018", tmp_path, tokenizer, "task.max_seq_length=128", "task.max_query_length=16",
                    "task.doc_stride=48")
    answer_at = len(long_text) - 8
    cases = {
        tnews: [{"id": 0, "text": long_text, "label": 0}],
        msra: [{"id": 0, "chars": list(long_text), "tags": ["O"] * len(long_text)}],
        cmrc: [{"id": "q", "question": "问题" * 100, "context": long_text + "答案在这里。",
                "answers": ["答案"], "answer_starts": [answer_at]}],
    }
    for task, examples in cases.items():
        features = task.featurize(examples, training=False)
        assert max(len(f["input_ids"]) for f in features) <= task.max_seq_length, task.name
        model = build_model(make_cfg(["model=tiny"]).model, task.model_class(), task.head_config())
        outputs = predict_dygraph(model, task, features, batch_size=8)
        assert len(task.postprocess(examples, features, outputs)) == 1, task.name
    # the answer at the far end of the long context is inside a training window, at the right tokens
    (train,) = [f for f in cmrc.featurize(cases[cmrc], training=True) if f["start_position"]]
    first = train["context_start"]
    span = train["offsets"][train["start_position"] - first][0], train["offsets"][train["end_position"] - first][1]
    assert cases[cmrc][0]["context"][span[0]:span[1]] == "答案"

    # MSRA: windows over a long sentence; logits planted only where a window owns a character come back whole
    gold = [LABELS[(i // 3) % len(LABELS)] for i in range(len(long_text))]
    example = [{"id": 0, "chars": list(long_text), "tags": gold}]
    features = msra.featurize(example, training=False)
    assert len(features) > 10
    outputs = []
    for f in features:
        win = Window(*f["window"])
        logits = np.zeros((len(f["input_ids"]), len(LABELS)), dtype=np.float32)
        for i in range(win.own_start, win.own_end):
            logits[i - win.start + 1, LABELS.index(gold[i])] = 1.0
        outputs.append((logits,))
    assert msra.postprocess(example, features, outputs) == [gold]


# ---- unknown labels, malformed lines, wrong columns, non-UTF-8 ---------------------------------------------------

@pytest.mark.parametrize(("split", "content", "message"), [
    ("train", lines({"label": "100", "sentence": "a"}, {"label": "999", "sentence": "b"}),
     r"train.json:2: unknown label '999'; labels.json has 100, 101, 102"),
    ("train", lines({"label": "100", "sentence": "a"}, {"sentence": "b"}),
     r"train.json:2: no 'label' \(every training line needs one"),
    ("dev", lines({"label": "100", "sentence": "a"}, '{"label": "100", "sentence": "b"'),
     r"dev.json:2: malformed JSON line"),
    ("dev", lines({"label": "100", "sentence": "a"}, {"label": "100", "sentence": 7}),
     r"dev.json:2: missing or non-string 'sentence'"),
])
def test_bad_tnews_lines(tmp_path, tokenizer, split, content, message):
    task = task_for("tnews", tnews_dir(tmp_path, **{split: content}), tokenizer)
    with pytest.raises(DataError, match=message):
        task.read_split(split)


def test_bad_tnews_labels_file(tmp_path, tokenizer):
    data = tnews_dir(tmp_path, labels=lines(TNEWS_LABELS[0], "{oops"))
    with pytest.raises(DataError, match=r"labels.json:2: malformed JSON line"):
        task_for("tnews", data, tokenizer)
    shutil.rmtree(data)
    data = tnews_dir(tmp_path, labels=lines(TNEWS_LABELS[0], TNEWS_LABELS[0]))
    with pytest.raises(DataError, match=r"labels.json: needs two or more distinct labels, found \['100', '100'\]"):
        task_for("tnews", data, tokenizer)


@pytest.mark.parametrize(("content", "message"), [
    ("中\tB-LOC\n国\tB-CITY\n", r"train.txt:2: unknown tag 'B-CITY'; tags are O, B-PER"),
    ("中\tB-LOC\n国\tI-LOC\tx\n", r"train.txt:2: expected 2 tab-separated columns \(character, tag\), got 3"),
    ("中\tB-LOC\n\n国\n", r"train.txt:3: expected 2 tab-separated columns \(character, tag\), got 1"),
    ("中 B-LOC\n", r"train.txt:1: expected 2 tab-separated columns"),
])
def test_bad_msra_lines(tmp_path, tokenizer, content, message):
    (tmp_path / "train.txt").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        task_for("msra_ner", tmp_path, tokenizer).read_split("train")


def test_lone_inside_tags_are_repaired_as_seqeval_reads_them(tmp_path, tokenizer, caplog):
    # I-LOC after O, I-PER after B-LOC and I-ORG first in a sentence open entities (seqeval's default mode)
    chars = "我在北京见到张三和中信公司"
    tags = ["O", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER", "I-PER", "O", "I-ORG", "I-ORG", "I-ORG", "I-ORG"]
    content = "".join(f"{c}\t{t}\n" for c, t in zip(chars[:8], tags[:8])) + "\n"
    content += "".join(f"{c}\t{t}\n" for c, t in zip(chars[8:], tags[8:]))
    (tmp_path / "test.txt").write_text(content, encoding="utf-8")
    task = task_for("msra_ner", tmp_path, tokenizer)
    first, second = task.read_split("test")
    assert first["tags"] == ["O", "O", "B-LOC", "I-LOC", "B-LOC", "B-PER", "I-PER", "O"]
    assert second["tags"] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"]
    assert task.read_counts["test_lone_inside_tags_repaired"] == 3
    path = tmp_path / "test.txt"
    assert f"{path}:3, {path}:6, {path}:10" in caplog.text
    # scores do not change: the metric already reads the lone I- tags as entity starts
    original = [tags[:8], tags[8:]]
    repaired = [first["tags"], second["tags"]]
    assert entity_f1(original, repaired, types=("PER", "ORG", "LOC"))["f1"] == 100.0
    assert entity_f1(original, original) == entity_f1(repaired, repaired)


@pytest.mark.parametrize(("name", "filename", "good", "message"), [
    ("tnews", "dev.json", lines({"label": "100", "sentence": "好"}), r"dev.json:2: not valid UTF-8"),
    ("msra_ner", "test.txt", "中\tO\n", r"test.txt:2: not valid UTF-8"),
    ("cmrc2018", "cmrc2018_dev.json", "", r"cmrc2018_dev.json: not valid UTF-8"),
])
def test_non_utf8_bytes(tmp_path, tokenizer, name, filename, good, message):
    data = tnews_dir(tmp_path) if name == "tnews" else tmp_path
    (data / filename).write_bytes(good.encode() + "国\tO\n".encode("gbk"))
    task = task_for(name, data, tokenizer)
    with pytest.raises(DataError, match=message):
        task.read_split(filename.split(".")[0].removeprefix("cmrc2018_"))


def test_malformed_cmrc_file_names_the_line(tmp_path, tokenizer):
    (tmp_path / "cmrc2018_train.json").write_text('{"data": [\n{"paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"cmrc2018_train.json:2: malformed JSON"):
        task_for("cmrc2018", tmp_path, tokenizer).read_split("train")


# ---- CMRC answers that the context does not contain: left out of training, counted ----------------------------

def test_cmrc_answers_not_in_the_context_are_skipped_and_counted(tmp_path, tokenizer):
    (tmp_path / "cmrc2018_train.json").write_text(squad(
        qa("right", "首都？", "北京", 0),
        qa("wrong-offset", "国家？", "中国", 0),  # found by its text
        qa("absent", "哪里？", "上海", 0),  # nowhere in the context
    ), encoding="utf-8")
    task = task_for("cmrc2018", tmp_path, tokenizer, "task.max_seq_length=64", "task.max_query_length=16")
    examples = task.read_split("train")
    features = task.featurize(examples, training=True)
    assert sorted({examples[f["example_index"]]["id"] for f in features}) == ["right", "wrong-offset"]
    assert task.data_stats() == {"realigned_answers": 1, "unaligned_answers": 1}


# ---- vocabulary --------------------------------------------------------------------------------------------------

def vocab_cfg(path, *overrides):
    return make_cfg(["model=tiny", f"model.vocab_file={path}", *overrides]).model


def test_missing_vocabulary(tmp_path):
    with pytest.raises(ConfigError, match=f"vocabulary not found: {tmp_path / 'vocab.txt'}.*model.vocab_file"):
        build_tokenizer(vocab_cfg(tmp_path / "vocab.txt"))


def test_vocabulary_larger_than_the_model(tmp_path):
    real = DATA_DIR / "vocab" / "ernie-3.0" / "vocab.txt"
    with pytest.raises(ConfigError, match=r"has 39980 tokens but model.vocab_size=30000"):
        build_tokenizer(vocab_cfg(real, "model.vocab_size=30000"))


@pytest.mark.parametrize(("content", "message"), [
    (b"[PAD]\n[CLS]\n\xff\xfe\n[SEP]\n", r"vocab.txt:3: not valid UTF-8"),
    (b"[PAD]\n[CLS]\n[SEP]\n[MASK]\na\n", r"lacks the special tokens \[UNK\]"),
])
def test_broken_vocabulary(tmp_path, content, message):
    (tmp_path / "vocab.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        build_tokenizer(vocab_cfg(tmp_path / "vocab.txt"))


# ---- artifacts that do not fit the command: one-line errors, exit code 2, no traceback --------------------------

def assert_one_line_error(result, *fragments):
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1, out
    flat = " ".join(out.split())  # the console may wrap a long line
    for fragment in fragments:
        assert fragment in flat, out


def test_int8_export_asked_for_fp32(tmp_path):
    result = run_script("infer.py", "model=tiny", "task=tnews", "strategy=ptq", "precision=fp32", tmp=tmp_path)
    assert_one_line_error(result, "strategy=ptq holds an INT8 model, which precision=fp32 cannot run")


def test_checkpoint_of_another_task(tmp_path):
    from paddlenlp.transformers import ErnieForTokenClassification

    from ernie_lab.tasks.heads import ErnieSequenceClassifier
    from ernie_lab.training import finetune

    def cfg(task, *extra):
        return make_cfg(isolated_overrides(tmp_path) + ["model=tiny", f"task={task}", *extra])

    tnews = cfg("tnews", "task.data.limit.train=16", "task.data.limit.eval=8", "train.max_steps=2")
    finetune(tnews, RecordingRun())
    msra_ckpt = artifacts.finetuned_dir(cfg("msra_ner"))
    shutil.copytree(artifacts.finetuned_dir(tnews), msra_ckpt)

    with pytest.raises(MissingArtifactError, match="fine-tuned for task tnews, not for a ErnieForTokenClassification"):
        load_finetuned(msra_ckpt, ErnieForTokenClassification)
    with pytest.raises(MissingArtifactError,
                       match=r"fine-tuned for task tnews, not for task msra_ner; run `python train.py task=msra_ner`"):
        load_finetuned(msra_ckpt, ErnieSequenceClassifier, expected_task="msra_ner")
    assert load_finetuned(msra_ckpt, ErnieSequenceClassifier, expected_task="tnews") is not None

    result = run_script("compress.py", "model=tiny", "task=msra_ner", "strategy=none", tmp=tmp_path)
    assert_one_line_error(result, f"{msra_ckpt} holds a checkpoint fine-tuned for task tnews")
