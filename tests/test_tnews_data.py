"""TNEWS reading: real lines map to the 15 labels; bad lines are errors that name file and line."""
from __future__ import annotations

import json
import shutil

import pytest

from ernie_lab.errors import DataError
from ernie_lab.modeling import build_tokenizer
from ernie_lab.tasks import build_task
from tests.conftest import DATA_DIR


@pytest.fixture
def tnews(cfg_factory):
    def make(data_dir=DATA_DIR / "tnews", *overrides):
        cfg = cfg_factory("model=tiny", f"task.data.dir={data_dir}", *overrides)
        return build_task(cfg.task, build_tokenizer(cfg.model))

    return make


def test_real_dev_lines_map_to_fifteen_labels(tnews):
    task = tnews(DATA_DIR / "tnews", "task.data.limit.eval=500")
    examples = task.load("eval")
    assert task.num_labels == 15 and len(examples) == 500
    assert {ex["label"] for ex in examples} <= set(range(15))
    first = json.loads(open(DATA_DIR / "tnews" / "dev.json", encoding="utf-8").readline())
    assert task.label_ids[examples[0]["label"]] == first["label"] and examples[0]["text"] == first["sentence"]
    features = task.featurize(examples[:3], training=False)
    assert features[0]["input_ids"][0] == task.tokenizer.cls_token_id
    assert features[0]["input_ids"][-1] == task.tokenizer.sep_token_id


def copy_with_dev(tmp_path, dev_bytes: bytes):
    data = tmp_path / "tnews"
    data.mkdir()
    shutil.copy(DATA_DIR / "tnews" / "labels.json", data / "labels.json")
    (data / "dev.json").write_bytes(dev_bytes)
    return data


GOOD = '{"label": "102", "label_desc": "news_entertainment", "sentence": "好看"}\n'.encode()


@pytest.mark.parametrize(
    "bad, message",
    [
        (b'{"label": "102", "sentence": \n', r"dev.json:2: malformed JSON"),
        ('{"label": "999", "sentence": "x"}\n'.encode(), r"dev.json:2: unknown label '999'"),
        (b'{"label": "102"}\n', r"dev.json:2: missing or non-string 'sentence'"),
        (b'{"label": "102", "sentence": "\xff\xfe"}\n', r"dev.json:2: not valid UTF-8"),
        (b"[1, 2]\n", r"dev.json:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tnews, tmp_path, bad, message):
    task = tnews(copy_with_dev(tmp_path, GOOD + bad))
    with pytest.raises(DataError, match=message):
        task.load("eval")


def test_missing_data_dir_says_where_to_point(tnews, tmp_path):
    with pytest.raises(DataError, match="paths.data_dir"):
        tnews(tmp_path / "nowhere")
