"""Config helpers: the resolvers the YAML files use, flattening for MLflow, and a check of CLI overrides
that names the valid keys when one is unknown (Hydra's own message does not list them)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ernie_lab.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
# Config groups a user picks with `group=option` (everything else is a key).
GROUPS = ("model", "task", "strategy", "runtime", "precision", "benchmark", "quantize", "prune", "tracking", "paths", "experiment")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


register_resolvers()


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists become their string form (one MLflow param each)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    out: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def group_options(group: str) -> list[str]:
    """The options of a config group, as a user would type them."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_overrides(argv: Iterable[str], config_name: str = "config") -> None:
    """Fail before Hydra starts if an override names a key that does not exist, listing the keys that do.

    Group choices (`task=nope`) are left to Hydra, whose error already lists the options. Then every value is
    checked against the schema (ernie_lab.schema)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # malformed syntax: Hydra reports it with its own pointer into the string
        return
    _check_keys(overrides, config_name)
    _check_values(args, config_name)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The config a job gets from these overrides (no Hydra section), composed outside any Hydra app (the
    pre-flight, tests), with runtime=auto already replaced by its engine."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
            return resolve_runtime(cfg, overrides, lambda more: compose(config_name=config_name, overrides=more))
    finally:
        GlobalHydra.instance().clear()


def resolve_runtime(cfg: DictConfig, overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> DictConfig:
    """A config composed with runtime=auto, composed again (`compose(overrides)`) on the engine that
    `runtime.auto_runtime` picks for its precision, so that the user's `runtime.*` overrides and an experiment's
    apply to that engine's own config; `runtime.requested` and `runtime.reason` record the choice. Any other
    config is returned as it is. A precision nothing here can run raises ConfigError saying what to run instead."""
    from ernie_lab.runtime import AUTO, auto_runtime

    if OmegaConf.select(cfg, "runtime.name") != AUTO:
        return cfg
    engine, why = auto_runtime(cfg.precision.name)
    resolved = compose([*overrides, f"runtime={engine}"])  # the last choice of a group wins
    with open_dict(resolved):
        resolved.runtime.requested = AUTO
        resolved.runtime.reason = why
    return resolved


def _compose(config_name: str, overrides: list[str], resolve: bool = True) -> DictConfig | None:
    """As compose_config, or None if Hydra itself will refuse the overrides (its own message names the problem).
    With `resolve`, a runtime=auto that cannot pick an engine stays auto: the pre-flight reports that per job."""
    try:
        return compose_config(config_name, overrides)
    except ConfigError:
        if not resolve:
            raise
        return _compose(config_name, [*overrides, "runtime=cpu"], resolve=False)
    except Exception:  # a bad group choice or syntax
        return None


# More jobs than this are checked one swept value at a time (each with the first of the other sweeps).
MAX_CHECKED_JOBS = 64


def sweep_jobs(argv: Iterable[str]) -> list[list[str]]:
    """The jobs of a command line, each as its list of overrides, in the order Hydra's basic sweeper runs them
    (the cartesian product of the comma sweeps). A sweep that cannot be listed here (ranges, globs: Hydra expands
    them itself) stays as written, and such jobs are left to their own check; more than MAX_CHECKED_JOBS jobs are
    reduced to one per swept value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # malformed syntax: Hydra reports it with its own pointer into the string
        return [args]
    choices: list[list[str]] = []
    for ov in overrides:
        values = None
        if ov.is_sweep_override():
            try:
                values = list(ov.sweep_string_iterator())
            except Exception:  # ranges and globs Hydra expands itself: left to the job's own check
                values = None
        lhs = ov.input_line.split("=", 1)[0]
        choices.append([f"{lhs}={v}" for v in values] if values else [ov.input_line])
    count = 1
    for c in choices:
        count *= len(c)
    if count <= MAX_CHECKED_JOBS:
        return [list(job) for job in itertools.product(*choices)]
    first = [c[0] for c in choices]
    jobs = [first]
    for i, c in enumerate(choices):
        jobs += [first[:i] + [v] + first[i + 1:] for v in c[1:]]
    return jobs


def swept_part(job: list[str], argv: Iterable[str]) -> str:
    """The overrides that tell one job of a sweep from the others (`task=tnews precision=fp16`)."""
    fixed = set(argv)
    return " ".join(o for o in job if o not in fixed and not o.startswith("hydra")) or " ".join(job)


def _check_values(argv: list[str], config_name: str) -> None:
    """Every value of every job's composed config against ernie_lab.schema, so that no job of a multirun can start
    with a bad value."""
    from ernie_lab.schema import validate

    for job in sweep_jobs(argv):
        cfg = _compose(config_name, [o for o in job if not o.startswith("hydra")])
        if cfg is not None:
            validate(cfg)


def _check_keys(overrides: list, config_name: str) -> None:
    group_args, keys = [], []
    for ov in overrides:
        key = ov.key_or_group
        if ov.package is not None or key.startswith("hydra") or ov.is_add() or ov.is_delete() or ov.is_force_add():
            continue
        if key in GROUPS:
            first = next(iter(ov.sweep_string_iterator())) if ov.is_sweep_override() else ov.get_value_element_as_str()
            group_args.append(f"{key}={first}")
        else:
            keys.append(key)
    if not keys:
        return
    cfg = _compose(config_name, group_args)
    if cfg is None:  # a bad group choice: Hydra's message lists the options
        return
    for key in keys:
        node: Any = cfg
        walked: list[str] = []
        for part in key.split("."):
            if isinstance(node, DictConfig) and part in node:
                node = node._get_node(part)  # no interpolation resolution needed to walk
                walked.append(part)
                continue
            where = ".".join(walked) or "the top level"
            if isinstance(node, DictConfig):
                valid = ", ".join(sorted(str(k) for k in node.keys()))
                raise ConfigError(f"Unknown config key '{key}': '{part}' is not under {where}. Valid keys there: {valid}")
            raise ConfigError(f"Unknown config key '{key}': {where} is a value, not a section")
