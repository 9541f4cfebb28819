"""Config helpers: the resolvers the YAML files use, flattening for MLflow, and a check of CLI overrides
that names the valid keys when one is unknown (Hydra's own message does not list them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

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
    _check_values(overrides, config_name)


def _compose(config_name: str, overrides: list[str]) -> DictConfig | None:
    """The config as a job would get it (no Hydra section), or None if Hydra itself will refuse the overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except Exception:  # a bad group choice or syntax: Hydra's own message names it
        return None
    finally:
        GlobalHydra.instance().clear()


def _check_values(overrides: list, config_name: str) -> None:
    """Every value of the composed config against ernie_lab.schema; for a sweep (`a=1,2`), every combination of
    one swept value with the first of the others, so that no job of a multirun can start with a bad value."""
    from ernie_lab.schema import validate

    base, alternatives = [], []
    for ov in (o for o in overrides if not o.key_or_group.startswith("hydra")):
        if ov.is_sweep_override():
            try:
                values = list(ov.sweep_string_iterator())
            except Exception:  # ranges and globs Hydra expands itself: leave them to the job's own check
                values = []
            if not values:
                continue
            lhs = ov.input_line.split("=", 1)[0]
            base.append(f"{lhs}={values[0]}")
            alternatives += [(len(base) - 1, f"{lhs}={v}") for v in values[1:]]
        else:
            base.append(ov.input_line)
    for position, replacement in [(None, None), *alternatives]:
        args = list(base)
        if position is not None:
            args[position] = replacement
        cfg = _compose(config_name, args)
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
