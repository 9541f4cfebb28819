"""Every config composes; unknown values and keys fail at once with the valid choices listed."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ernie_lab.config import check_overrides, flatten, group_options
from ernie_lab.errors import ConfigError
from ernie_lab.runtime import auto_runtime, check_precision, hardware_gap
from tests.conftest import make_cfg, run_script

# options whose `name` says what they composed to rather than repeating the option: the model named by its depth
# (outside the quick start's table), runtime=auto by the engine it picks for FP32 here
NAMED_BY_DEPTH = {("model", "e5-small-zh-quickstart"): "e5-small-zh-l2", ("runtime", "auto"): auto_runtime("fp32")[0]}
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
            assert cfg[group].name == NAMED_BY_DEPTH.get((group, option), option)


def _literal_leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a raw config file that is not an interpolation."""
    for key in node:
        if key == "defaults":
            continue
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if OmegaConf.is_dict(value):
            yield from _literal_leaves(value, path + ".")
        else:
            yield path, OmegaConf.to_container(value) if OmegaConf.is_list(value) else value


@pytest.mark.parametrize("group", GROUPS)
def test_every_value_a_group_option_sets_is_the_value_a_run_gets(group):
    # The shared config must never silently override a group or an experiment (experiment=quickstart's
    # train.freeze_word_embeddings once came out false because config.yaml was merged after it).
    from ernie_lab.config import CONF_DIR

    for option in group_options(group):
        path = CONF_DIR / group / f"{option}.yaml"
        raw = OmegaConf.load(path)
        is_global = path.read_text().startswith("# @package _global_")
        cfg = make_cfg([f"{group}={option}"])
        root = cfg if is_global else cfg[group]
        for key, value in _literal_leaves(raw):
            if (group, option, key) == ("runtime", "auto", "name"):
                assert cfg.runtime.requested == "auto" and cfg.runtime.name == NAMED_BY_DEPTH[("runtime", "auto")]
                continue
            got = OmegaConf.select(root, key)
            got = OmegaConf.to_container(got) if OmegaConf.is_list(got) else got
            assert got == value, f"{group}={option}: {key} is {got!r} in the composed config, the file says {value!r}"


def test_pipeline_config_composes_with_the_quickstart_experiment():
    cfg = make_cfg([], config_name="pipeline")
    assert cfg.model.name == "e5-small-zh-l4" and cfg.model.init == "package"  # TNEWS, the first task
    assert list(cfg.pipeline.tasks) == ["tnews", "msra_ner", "cmrc2018"]
    for task in cfg.pipeline.tasks:  # each task gets its own budget from the quickstart table
        task_cfg = make_cfg([f"task={task}"], config_name="pipeline")
        budget = task_cfg.quickstart[task]
        assert task_cfg.train.max_steps == budget.max_steps and task_cfg.train.batch_size == budget.batch_size
        assert task_cfg.task.max_seq_length == budget.max_seq_length
        # and its own depth of the pretrained model, named after it so checkpoints of two depths never mix
        assert task_cfg.model.num_hidden_layers == budget.layers
        assert task_cfg.model.name == f"e5-small-zh-l{budget.layers}"
        assert task_cfg.model.package.cache_dir.endswith(f"/pretrained/e5-small-zh-l{budget.layers}")


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


# --- the schema (ernie_lab/schema.py): every value checked before any work or MLflow run --------------------------
# The four cases of issue #12, then more across the groups: (overrides, the key the message must name).
BAD_VALUES = [
    (["train.learning_rate=abc"], "train.learning_rate"),
    (["task=tnews", "task.max_seq_length=-3"], "task.max_seq_length"),
    (["runtime.threads=0"], "runtime.threads"),
    (["strategy=dynabert", "prune.width_mult=1.5"], "prune.width_mult"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.epochs=1.5"], "train.epochs"),
    (["train.warmup_proportion=2"], "train.warmup_proportion"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.max_steps=-1"], "train.max_steps"),
    (["train.save_every_steps=0"], "train.save_every_steps"),
    (["train.resume=maybe"], "train.resume"),
    (["prune.train.learning_rate=-0.001"], "prune.train.learning_rate"),
    (["task=cmrc2018", "task.doc_stride=0"], "task.doc_stride"),
    (["task.data.heldout_size=0"], "task.data.heldout_size"),
    (["task.data.limit.train=-5"], "task.data.limit.train"),
    (["task.data.source=nowhere"], "task.data.source"),
    (["model=tiny", "task.max_seq_length=4096"], "task.max_seq_length"),
    (["model.hidden_dropout_prob=1.5"], "model.hidden_dropout_prob"),
    (["model.init=magic"], "model.init"),
    (["benchmark.batch_size=0"], "benchmark.batch_size"),
    (["benchmark.passes=0"], "benchmark.passes"),
    (["benchmark.warmup_seconds=-1"], "benchmark.warmup_seconds"),
    (["quantize.batch_nums=0"], "quantize.batch_nums"),
    (["quantize.algo=avg"], "quantize.algo"),
    (["quantize.hist_percent=2"], "quantize.hist_percent"),
    (["quantize=search", "quantize.search.budget=-1"], "quantize.search.budget"),
    (["quantize.search.batch_nums=[4,0]"], "quantize.search.batch_nums"),
    (["prune.train_widths=[1.0,0]"], "prune.train_widths"),
    (["prune.importance.samples=0"], "prune.importance.samples"),
    (["prune.distill.temperature=0"], "prune.distill.temperature"),
    (["runtime=onnxruntime", "runtime.int8_mode=fast"], "runtime.int8_mode"),
    (["runtime=onnxruntime", "runtime.int8.calibration.percentile=150"], "runtime.int8.calibration.percentile"),
    (["runtime=gpu", "runtime.gpu_id=-1"], "runtime.gpu_id"),
    (["runtime=gpu", "runtime.tensorrt.workspace_mb=0"], "runtime.tensorrt.workspace_mb"),
    (["seed=-1"], "seed"),
    (["experiment=quickstart", "quickstart.tnews.max_steps=0"], "quickstart.tnews.max_steps"),
    (["-m", "train.learning_rate=1e-5,abc"], "train.learning_rate"),  # every value of a sweep
]


@pytest.mark.parametrize("overrides,key", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_in_one_line_naming_key_value_and_what_is_allowed(overrides, key):
    with pytest.raises(ConfigError) as err:
        check_overrides(overrides)
    message = str(err.value)
    value = next(o for o in overrides if o.startswith(key + "=")).split("=", 1)[1].split(",")[-1]
    assert "\n" not in message
    assert message.startswith(f"{key}="), message
    assert value.strip("[]").split(",")[-1] in message and "allowed:" in message, message


def test_an_interpolated_value_is_checked_resolved():
    from ernie_lab.schema import problems, validate

    # under the quick start, train.batch_size is ${quickstart.${task.name}.batch_size}, and prune.train.batch_size
    # is ${train.batch_size}: both are checked at their resolved value, and the message names the key typed
    cfg = make_cfg(["experiment=quickstart", "quickstart.tnews.batch_size=0"])
    direct, derived = problems(cfg)
    assert [line.split("=")[0] for line in direct] == ["quickstart.tnews.batch_size"]
    assert {line.split("=")[0] for line in derived} == {"train.batch_size", "prune.train.batch_size"}
    with pytest.raises(ConfigError, match=r"^quickstart\.tnews\.batch_size=0 is not valid"):
        validate(cfg)


@pytest.mark.parametrize("script,args", [
    ("train.py", ["train.learning_rate=abc"]),
    ("train.py", ["task=tnews", "task.max_seq_length=-3"]),
    ("infer.py", ["runtime.threads=0"]),
    ("compress.py", ["strategy=dynabert", "prune.width_mult=1.5"]),
])
def test_the_issue_cases_exit_2_before_any_run(tmp_path, script, args):
    result = run_script(script, *args, tmp=tmp_path, timeout=180)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and args[-1].split("=")[0] in lines[0] and "allowed" in lines[0], result.stdout
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run created, so none left RUNNING


def _every_config():
    for group in GROUPS + ["prune"]:
        for option in group_options(group):
            yield f"{group}={option}", make_cfg([f"{group}={option}"])
    for option in group_options("experiment"):
        for task in group_options("task"):
            yield f"pipeline experiment={option} task={task}", make_cfg([f"experiment={option}", f"task={task}"],
                                                                       config_name="pipeline")
    yield "report", make_cfg([], config_name="report")


def test_every_group_option_and_experiment_validates():
    from ernie_lab.schema import problems

    for name, cfg in _every_config():
        direct, derived = problems(cfg)
        assert not direct and not derived, f"{name}: {direct + derived}"


def test_every_numeric_key_has_a_rule():
    from ernie_lab.schema import undeclared

    def numeric(node):
        value = node._value()
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    missing = {key for _, cfg in _every_config() for key in undeclared(cfg, numeric)}
    assert not missing, f"add these keys to ernie_lab/schema.py SCHEMA: {sorted(missing)}"
