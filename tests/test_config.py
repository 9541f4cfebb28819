"""Every config composes; unknown values and keys fail at once with the valid choices listed."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ernie_lab.config import check_overrides, flatten, group_options
from ernie_lab.errors import ConfigError
from ernie_lab.runtime import check_precision, hardware_gap
from tests.conftest import make_cfg, run_script

GROUPS = ["model", "task", "strategy", "runtime", "precision", "benchmark", "quantize", "tracking", "paths", "experiment"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_resolves(group):
    options = group_options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        cfg = make_cfg([f"{group}={option}"])
        resolved = OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation anywhere
        assert resolved["model"]["name"]
        if group not in ("experiment", "paths", "tracking", "benchmark", "quantize"):
            assert cfg[group].name == option


def test_pipeline_config_composes_with_the_quickstart_experiment():
    cfg = make_cfg([], config_name="pipeline")
    assert cfg.model.name == "ernie-3.0-small"
    assert list(cfg.pipeline.tasks) == ["tnews", "msra_ner", "cmrc2018"]
    for task in cfg.pipeline.tasks:  # each task gets its own budget from the quickstart table
        task_cfg = make_cfg([f"task={task}"], config_name="pipeline")
        budget = task_cfg.quickstart[task]
        assert task_cfg.train.max_steps == budget.max_steps and task_cfg.train.batch_size == budget.batch_size
        assert task_cfg.task.max_seq_length == budget.max_seq_length


def test_model_sizes_match_the_published_ernie_3_family():
    sizes = {name: make_cfg([f"model={name}"]).model for name in group_options("model")}
    published = {  # layers, hidden, heads, FFN
        "ernie-3.0-xbase": (20, 1024, 16, 4096),
        "ernie-3.0-base": (12, 768, 12, 3072),
        "ernie-3.0-medium": (6, 768, 12, 3072),
        "ernie-3.0-mini": (6, 384, 12, 1536),
        "ernie-3.0-micro": (4, 384, 12, 1536),
        "ernie-3.0-nano": (4, 312, 12, 1248),
    }
    for name, dims in published.items():
        m = sizes[name]
        assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.intermediate_size) == dims
        assert m.pretrained_name == f"{name}-zh"


def test_any_hyperparameter_can_be_overridden():
    cfg = make_cfg(["train.learning_rate=0.123", "task.max_seq_length=64", "runtime.threads=1"])
    assert cfg.train.learning_rate == 0.123 and cfg.task.max_seq_length == 64 and cfg.runtime.threads == 1


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        check_overrides(["task=tnews", "train.learning_rat=1e-4"])
    message = str(err.value)
    assert "train.learning_rat" in message and "learning_rate" in message and "warmup_proportion" in message


def test_known_keys_and_group_sweeps_pass_the_check():
    check_overrides(["-m", "task=tnews", "precision=fp32,int8", "train.learning_rate=1e-4", "+extra=1"])


def test_flatten_gives_dotted_param_names():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_fp16_on_cpu_points_at_bf16():
    cfg = make_cfg(["precision=fp16"])
    with pytest.raises(ConfigError, match="bf16"):
        check_precision(cfg.runtime, "fp16")


def test_bf16_is_refused_exactly_where_the_cpu_lacks_bf16_units():
    from ernie_lab.runtime import cpu_flags

    cfg = make_cfg([])
    flags = cpu_flags()
    has_units = flags.get("avx512_bf16") or flags.get("amx_bf16")
    assert (hardware_gap(cfg.runtime, "bf16") is None) == bool(has_units)


def test_unknown_group_value_fails_with_the_choices(tmp_path):
    result = run_script("infer.py", "task=nope", tmp=tmp_path, timeout=120)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "nope" in out and "tnews" in out


def test_unknown_key_fails_before_any_work(tmp_path):
    result = run_script("train.py", "train.epoch=3", tmp=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "train.epoch" in result.stdout and "epochs" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()
