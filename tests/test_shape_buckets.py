"""runtime=cpu's shape settings: batch lengths rounded up to `runtime.pad_to_multiple` (with [PAD], never past
max_seq_length unless a sample is that long) and oneDNN's per-shape cache capacity passed to Paddle."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from ernie_lab.inference.workload import EvalWorkload


def workload(cfg_factory, tokenizer, multiple, max_len=None):
    from ernie_lab.tasks import build_task

    extra = [f"task.max_seq_length={max_len}"] if max_len else []
    task = build_task(cfg_factory("model=tiny", "task.data.limit.eval=70", *extra).task, tokenizer)
    examples = task.load("eval")
    work = EvalWorkload(task, examples, task.featurize(examples, training=False), 32, multiple)
    return work, work.setup()


def test_lengths_round_up_with_pad_tokens(cfg_factory, tokenizer):
    plain, plain_batches = workload(cfg_factory, tokenizer, 1)
    work, batches = workload(cfg_factory, tokenizer, 16)
    assert len(batches) == len(plain_batches) == 3
    for before, after in zip(plain_batches, batches):
        length, padded = before["input_ids"].shape[1], after["input_ids"].shape[1]
        assert padded % 16 == 0 and 0 <= padded - length < 16
        assert (after["input_ids"][:, :length] == before["input_ids"]).all()
        assert (after["input_ids"][:, length:] == tokenizer.pad_token_id).all()
        assert (after["token_type_ids"][:, length:] == 0).all()
    assert work.batch_shapes == [tuple(b["input_ids"].shape) for b in batches]
    assert work.finish([[np.zeros((len(b["input_ids"]), 15), "float32")] for b in batches])["padded_seq_len_mean"] == \
        pytest.approx(np.mean([b["input_ids"].shape[1] for b in batches]))


def test_never_past_max_seq_length(cfg_factory, tokenizer):
    _, batches = workload(cfg_factory, tokenizer, 64, max_len=40)
    assert {b["input_ids"].shape[1] for b in batches} == {40}


def test_bad_multiple_is_a_one_line_error(cfg_factory, tokenizer):
    from ernie_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime.pad_to_multiple=0 is not valid; choose an integer >= 1"):
        workload(cfg_factory, tokenizer, 0)


class RecordingConfig:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


def test_onednn_cache_capacity_reaches_paddle():
    from ernie_lab.errors import ConfigError
    from ernie_lab.inference.paddle_engine import PaddleInferenceBackend

    runtime = OmegaConf.create({"threads": 2, "onednn": True, "int8_ops": ["fc"], "onednn_cache_capacity": 16})
    config = RecordingConfig()
    PaddleInferenceBackend._configure_cpu(config, runtime, "fp32")
    assert ("set_mkldnn_cache_capacity", (16,)) in config.calls
    config = RecordingConfig()
    PaddleInferenceBackend._configure_cpu(config, OmegaConf.merge(runtime, {"onednn_cache_capacity": 0}), "fp32")
    assert not [c for c in config.calls if c[0] == "set_mkldnn_cache_capacity"]
    with pytest.raises(ConfigError, match="runtime.onednn_cache_capacity=-1 is not valid"):
        PaddleInferenceBackend._configure_cpu(RecordingConfig(), OmegaConf.merge(runtime, {"onednn_cache_capacity": -1}), "fp32")
