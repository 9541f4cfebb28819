"""The typed schema of every config group: one table of key -> type, range or choices, checked on the composed
config before any work and before any MLflow run starts (ernie_lab.cli's pre-flight, and again in each job).

Why a table and not structured-config dataclasses: the YAML groups and experiments stay as they are (with their
interpolations and per-task tables), and a value is checked after resolution, where the code will read it. A
bad value fails in one line naming the key, the value and what is allowed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from ernie_lab.errors import ConfigError

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """What one key accepts. `kind`: int, float (ints too), bool, str or list; `low`/`high` bound numbers (a key
    name as a bound is read from the config); `choices` lists the valid values (or, as a dict, the valid values
    per `choices_by` value); `item` checks every element of a list."""

    kind: type
    low: float | str | None = None
    high: float | str | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | dict | None = None
    choices_by: str | None = None
    item: "Rule | None" = None
    nullable: bool = False
    nonempty: bool = False

    def _bound(self, bound, cfg) -> tuple[float | None, str]:
        if isinstance(bound, str):
            value = OmegaConf.select(cfg, bound, default=None)
            return value, f"{bound}={value}"
        return bound, f"{bound:g}" if isinstance(bound, float) else str(bound)

    def _choices(self, cfg) -> tuple | None:
        if isinstance(self.choices, dict):
            return self.choices.get(OmegaConf.select(cfg, self.choices_by, default=None))
        return self.choices

    def allowed(self, cfg) -> str:
        """What is allowed, in words, e.g. `an integer >= 1` or `one of: hist, mse`."""
        choices = self._choices(cfg)
        if choices is not None:
            text = "one of: " + ", ".join(_show(c) for c in choices)
        elif self.kind is list:
            text = ("a non-empty list" if self.nonempty else "a list") + (f" of {self.item.allowed(cfg)}" if self.item else "")
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
            low, low_text = self._bound(self.low, cfg)
            high, high_text = self._bound(self.high, cfg)
            if low is not None and high is not None:
                text += f" in {'(' if self.low_open else '['}{low_text}, {high_text}{')' if self.high_open else ']'}"
            elif low is not None:
                text += f" {'>' if self.low_open else '>='} {low_text}"
            elif high is not None:
                text += f" {'<' if self.high_open else '<='} {high_text}"
        return text + (" or null" if self.nullable else "")

    def accepts(self, value: Any, cfg) -> bool:
        if value is None:
            return self.nullable
        choices = self._choices(cfg)
        if choices is not None:
            return any(type(value) is type(c) and value == c for c in choices)  # True is not 1 here
        if self.kind is list:
            if not isinstance(value, (list, tuple, ListConfig)) or (self.nonempty and len(value) == 0):
                return False
            return self.item is None or all(self.item.accepts(v, cfg) for v in value)
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and (not self.nonempty or bool(value))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low, _ = self._bound(self.low, cfg)
        high, _ = self._bound(self.high, cfg)
        if low is not None and (value < low or (self.low_open and value == low)):
            return False
        if high is not None and (value > high or (self.high_open and value == high)):
            return False
        return True


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# Shorthands for the table.
def Int(low=None, high=None, **kw) -> Rule:
    return Rule(int, low, high, **kw)


def Num(low=None, high=None, **kw) -> Rule:
    return Rule(float, low, high, **kw)


def Positive(**kw) -> Rule:
    return Rule(float, 0, None, low_open=True, **kw)


def Fraction(**kw) -> Rule:  # [0, 1)
    return Rule(float, 0, 1, high_open=True, **kw)


def Width(**kw) -> Rule:  # (0, 1]
    return Rule(float, 0, 1, low_open=True, **kw)


def Choice(*choices, **kw) -> Rule:
    return Rule(str, choices=tuple(choices), **kw)


def Bool(**kw) -> Rule:
    return Rule(bool, **kw)


def Str(**kw) -> Rule:
    return Rule(str, **kw)


def ListOf(item: Rule | None = None, **kw) -> Rule:
    return Rule(list, item=item, **kw)


COUNT = Int(1)  # steps, batches, examples, threads: at least one
COUNT_OR_NULL = Int(1, nullable=True)
ALGOS = ("hist", "mse", "KL", "abs_max")  # compression.quantize.ALGOS (avg fails in paddleslim 2.6)
PRECISIONS = ("fp32", "int8", "bf16", "fp16")


def _train_rules(prefix: str) -> dict[str, Rule]:
    """The optimisation keys shared by fine-tuning (train.*) and distillation (prune.train.*)."""
    return {
        f"{prefix}.epochs": COUNT,
        f"{prefix}.batch_size": COUNT,
        f"{prefix}.learning_rate": Positive(),
        f"{prefix}.max_steps": COUNT_OR_NULL,
        f"{prefix}.warmup_proportion": Num(0, 1),
        f"{prefix}.weight_decay": Num(0),
        f"{prefix}.max_grad_norm": Positive(nullable=True),
        f"{prefix}.log_every_steps": COUNT,
        f"{prefix}.save_every_steps": COUNT_OR_NULL,
        f"{prefix}.resume": Rule(str, choices=("auto", True, False)),
        f"{prefix}.group_by_length": Bool(),
    }


# key (fnmatch pattern over the dotted path) -> Rule. The first matching pattern applies.
SCHEMA: dict[str, Rule] = {
    "seed": Int(0),
    # train.py
    **_train_rules("train"),
    "train.eval_every_steps": COUNT_OR_NULL,
    "train.threads": COUNT,
    "train.freeze_word_embeddings": Bool(),
    "train.fused_attention": Bool(),
    # model/
    "model.name": Str(nonempty=True),
    "model.init": Choice("random", "pretrained", "checkpoint", "package"),
    "model.checkpoint_dir": Str(nullable=True),
    "model.pretrained_name": Str(nullable=True),
    "model.vocab_file": Str(nonempty=True),
    "model.vocab_size": COUNT,
    "model.max_position_embeddings": COUNT,
    "model.type_vocab_size": COUNT,
    "model.task_type_vocab_size": COUNT,
    "model.use_task_id": Bool(),
    "model.hidden_act": Choice("gelu", "relu", "tanh", "silu", "gelu_new"),
    "model.hidden_dropout_prob": Fraction(),
    "model.attention_probs_dropout_prob": Fraction(),
    "model.initializer_range": Positive(),
    "model.num_hidden_layers": COUNT,
    "model.hidden_size": COUNT,
    "model.num_attention_heads": COUNT,
    "model.intermediate_size": COUNT,
    "model.package.*": Str(),
    "model.pooling": Choice("cls", "mean"),
    # task/
    "task.name": Str(nonempty=True),
    # [CLS] x [SEP] at the least, and no longer than the position table
    "task.max_seq_length": Int(4, "model.max_position_embeddings"),
    "task.doc_stride": COUNT,
    "task.max_query_length": COUNT,
    "task.n_best_size": COUNT,
    "task.max_answer_length": COUNT,
    "task.answerless_windows": Num(0, 1),
    "task.selection_split": Choice("eval", "heldout"),
    "task.data.source": Choice("local", "online"),
    "task.data.dir": Str(nonempty=True),
    "task.data.eval_split": Choice("dev", "test"),
    "task.data.heldout_size": COUNT,
    "task.data.heldout_seed": Int(0),
    "task.data.limit.*": COUNT_OR_NULL,
    # strategy/, precision/
    "strategy.name": Str(nonempty=True),
    "strategy.steps": ListOf(Choice("prune", "export", "quantize"), nonempty=True),
    "strategy.int8_counterpart": Choice("ptq", "dynabert_ptq"),
    "precision.name": Choice(*PRECISIONS),
    "precision.weights": Choice("float", "int8"),
    # runtime/
    "runtime.name": Str(nonempty=True),
    # set when runtime=auto picked the engine (ernie_lab.config.resolve_runtime): what was asked, and why this one
    "runtime.requested": Choice("auto"),
    "runtime.reason": Str(nonempty=True),
    "runtime.engine": Choice("paddle", "onnxruntime", "openvino"),
    "runtime.device": Choice("cpu", "gpu"),
    "runtime.threads": COUNT,
    "runtime.onednn": Bool(),
    "runtime.int8_ops": ListOf(Str()),
    "runtime.flush_denormals": Bool(),
    "runtime.keep_freed_memory": Bool(),
    "runtime.onednn_cache_capacity": Int(0),
    "runtime.pad_to_multiple": COUNT,
    "runtime.precisions": ListOf(Choice(*PRECISIONS), nonempty=True),
    "runtime.gpu_id": Int(0),
    "runtime.gpu_memory_mb": COUNT,
    "runtime.tensorrt.enabled": Bool(),
    "runtime.tensorrt.workspace_mb": COUNT,
    "runtime.tensorrt.min_subgraph_size": COUNT,
    "runtime.tensorrt.cache_dir": Str(nonempty=True),
    "runtime.quantizes_float_export": Bool(),
    "runtime.onnx.opset": Int(7, 21),
    "runtime.int8_mode": Rule(str, choices={"onnxruntime": ("dynamic", "static"), "openvino": ("ptq", "accuracy_control")},
                              choices_by="runtime.name"),
    "runtime.int8.per_channel": Bool(),
    "runtime.int8.reduce_range": Rule(str, choices=("auto", True, False)),
    "runtime.int8.weight_type": Choice("int8", "uint8"),
    "runtime.int8.activation_type": Choice("int8", "uint8"),
    "runtime.int8.attention_matmuls": Bool(),
    "runtime.int8.calibration.method": Choice("minmax", "entropy", "percentile"),
    "runtime.int8.calibration.percentile": Num(0, 100, low_open=True),
    "runtime.int8.preset": Choice("mixed", "performance"),
    "runtime.int8.model_type": Choice("transformer", nullable=True),
    # SmoothQuant's alpha, or -1 to turn it off
    "runtime.int8.smooth_quant_alpha": Rule(float, -1, 1),
    "runtime.int8.overflow_fix": Choice("auto", "enable", "first_layer_only", "disable"),
    "runtime.int8.fast_bias_correction": Bool(),
    "runtime.int8.accuracy_control.max_drop": Positive(),
    "runtime.int8.accuracy_control.samples": COUNT,
    "runtime.int8.accuracy_control.max_num_iterations": COUNT,
    "runtime.performance_hint": Choice("LATENCY", "THROUGHPUT"),
    "runtime.compiled_cache": Bool(),
    # benchmark/
    "benchmark.batch_size": COUNT,
    "benchmark.warmup_batches": Int(0),
    "benchmark.warmup_seconds": Num(0),
    "benchmark.passes": COUNT,
    "benchmark.roofline.enabled": Bool(),
    "benchmark.roofline.cache_file": Str(nonempty=True),
    "benchmark.roofline.probe_seconds": Positive(),
    # quantize/
    "quantize.algo": Choice(*ALGOS),
    "quantize.hist_percent": Num(0, 1, low_open=True),
    "quantize.batch_size": COUNT,
    "quantize.batch_nums": COUNT,
    "quantize.weight_bits": Int(2, 16),
    "quantize.activation_bits": Int(2, 16),
    "quantize.weight_quantize_type": Choice("abs_max", "channel_wise_abs_max"),
    "quantize.quantizable_op_type": ListOf(Str(), nonempty=True),
    "quantize.onnx_format": Bool(),
    "quantize.skip": ListOf(Str()),
    "quantize.search.enabled": Bool(),
    "quantize.search.algos": ListOf(Choice(*ALGOS), nonempty=True),
    "quantize.search.batch_nums": ListOf(COUNT, nonempty=True),
    "quantize.search.eval_samples": COUNT,
    "quantize.search.budget": Num(0),
    "quantize.search.on_budget_miss": Choice("fail", "keep_best"),
    # prune/
    "prune.width_mult": Width(),
    "prune.train_widths": ListOf(Width(), nonempty=True),
    "prune.importance.samples": COUNT,
    "prune.importance.batch_size": COUNT,
    "prune.distill.temperature": Positive(),
    "prune.distill.hidden_weight": Num(0),
    **_train_rules("prune.train"),
    "prune.eval_samples": COUNT,
    "prune.reuse": Bool(),
    # tracking/, paths/
    "tracking.name": Str(nonempty=True),
    "tracking.tracking_uri": Str(nonempty=True),
    "tracking.artifact_location": Str(nullable=True),
    "tracking.experiment_name": Str(nonempty=True),
    "paths.*": Str(nonempty=True),
    # experiment=quickstart's per-task table
    "quickstart.*.layers": COUNT,
    "quickstart.*.max_steps": COUNT,
    "quickstart.*.batch_size": COUNT,
    "quickstart.*.learning_rate": Positive(),
    "quickstart.*.train_limit": COUNT,
    "quickstart.*.max_seq_length": Int(4, "model.max_position_embeddings"),
    "quickstart.*.prune_steps": COUNT,
    "quickstart.*.prune_eval_samples": COUNT,
    "quickstart.*.eval_limit": COUNT_OR_NULL,
    # experiment=converged's per-task table
    "converged.*.epochs": COUNT,
    "converged.*.batch_size": COUNT,
    "converged.*.learning_rate": Positive(),
    "converged.*.max_seq_length": Int(4, "model.max_position_embeddings"),
    "converged.*.eval_every_steps": COUNT_OR_NULL,
    "converged.*.prune_steps": COUNT_OR_NULL,
    # experiment=medium_engines' per-task eval slice and the warm-up that covers it
    "medium_engines.*.eval_limit": COUNT_OR_NULL,
    "medium_engines.*.warmup_batches": Int(0),
    # pipeline.yaml, report.yaml
    "pipeline.tasks": ListOf(Choice("tnews", "msra_ner", "cmrc2018"), nonempty=True),
    "pipeline.strategies": ListOf(Choice("none", "ptq", "dynabert", "dynabert_ptq")),
    "pipeline.variants": ListOf(ListOf(Str(), nonempty=True)),
    "pipeline.int8_runtime": Choice("auto", "cpu", "gpu", "onnxruntime", "openvino"),
    "pipeline.resume": Bool(),
    "pipeline.task_overrides.*": ListOf(Str()),
    "pipeline.continue_training.*": ListOf(Str()),
    "pipeline.publish_dir": Str(nullable=True),
    # conf/step_benchmark.yaml (python -m ernie_lab.step_benchmark)
    "step_benchmark.shapes": ListOf(ListOf(COUNT, nonempty=True), nonempty=True),
    "step_benchmark.warmup_steps": Int(0),
    "step_benchmark.timed_steps": COUNT,
    "step_benchmark.variants.*": ListOf(Str()),
    "step_benchmark.baseline": Str(nullable=True),
    "report.sweep_id": Str(nullable=True),
    "report.filter": Str(nullable=True),
    "report.output_dir": Str(nullable=True),
}


def rule_for(key: str) -> Rule | None:
    if key in SCHEMA:
        return SCHEMA[key]
    return next((rule for pattern, rule in SCHEMA.items() if "*" in pattern and fnmatchcase(key, pattern)), None)


def leaves(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value node) of every leaf, without resolving anything; Hydra's own section is left out."""
    for key in node.keys():
        name = f"{prefix}{key}"
        if name == "hydra":
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_none():
            yield from leaves(child, f"{name}.")
        else:
            yield name, child


def _only_hydra_unresolvable(exc: Exception) -> bool:
    """`${hydra:...}` resolves only inside a Hydra job; the job's own check sees those values."""
    return "hydra" in str(exc).lower() and ("resolver" in str(exc).lower() or "HydraConfig" in str(exc))


def problems(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """One sentence per invalid key: (keys set directly, keys whose value comes from an interpolation). The
    first of the former names what the user typed; the latter mostly repeat it under another name."""
    direct, derived = [], []
    for key, node in leaves(cfg):
        rule = rule_for(key)
        if rule is None:
            continue
        interpolated = node._is_interpolation()
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except Exception as exc:
            if _only_hydra_unresolvable(exc):
                continue
            (derived if interpolated else direct).append(f"{key}={node._value()} cannot be resolved: {exc}".splitlines()[0])
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.accepts(value, cfg):
            where = f" (from {node._value()})" if interpolated else ""
            (derived if interpolated else direct).append(f"{key}={_show_value(value)}{where} is not valid; allowed: "
                                                         f"{rule.allowed(cfg)}")
    return direct, derived


def _show_value(value) -> str:
    return repr(value) if isinstance(value, str) else _show(value) if not isinstance(value, list) else str(value)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for the first invalid key of `cfg`."""
    direct, derived = problems(cfg)
    if direct or derived:
        more = f" (and {len(direct) - 1} more)" if len(direct) > 1 else ""
        raise ConfigError((direct or derived)[0] + more)


def undeclared(cfg: DictConfig, accept: Callable[[Any], bool] = lambda v: True) -> list[str]:
    """Keys of `cfg` with no rule in SCHEMA (for the test that keeps the table complete)."""
    return [key for key, node in leaves(cfg) if rule_for(key) is None and accept(node)]
