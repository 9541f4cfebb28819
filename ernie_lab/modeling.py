"""Tokenizer and model construction: pretrained name (online), local checkpoint, or random initialisation
with the real vocabulary (offline). Nothing else in ernie_lab knows which one was used."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ernie_lab.errors import ConfigError, MissingArtifactError, check_choice

INITS = ("random", "pretrained", "checkpoint")
ARCH_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "task_type_vocab_size", "use_task_id", "initializer_range",
)


def build_tokenizer(model_cfg: DictConfig):
    from paddlenlp.transformers import ErnieTokenizer

    check_choice("model.init", model_cfg.init, INITS)
    if model_cfg.init == "pretrained":
        return ErnieTokenizer.from_pretrained(model_cfg.pretrained_name)
    if model_cfg.init == "checkpoint":
        return ErnieTokenizer.from_pretrained(str(_checkpoint_dir(model_cfg)))
    vocab = Path(model_cfg.vocab_file)
    if not vocab.is_file():
        raise ConfigError(f"vocabulary not found: {vocab} (set paths.data_dir or model.vocab_file)")
    tokenizer = ErnieTokenizer(vocab_file=str(vocab))
    if len(tokenizer.vocab) > int(model_cfg.vocab_size):
        raise ConfigError(
            f"vocabulary {vocab} has {len(tokenizer.vocab)} tokens but model.vocab_size={model_cfg.vocab_size}"
        )
    return tokenizer


def _checkpoint_dir(model_cfg: DictConfig) -> Path:
    if not model_cfg.checkpoint_dir:
        raise ConfigError("model.init=checkpoint needs model.checkpoint_dir=<directory saved by save_pretrained>")
    path = Path(model_cfg.checkpoint_dir)
    if not (path / "config.json").is_file():
        raise MissingArtifactError(f"model.checkpoint_dir={path} holds no saved model (no config.json)")
    return path


def ernie_config(model_cfg: DictConfig, **head):
    from paddlenlp.transformers import ErnieConfig

    return ErnieConfig(**{k: model_cfg[k] for k in ARCH_KEYS}, **head)


def build_model(model_cfg: DictConfig, model_class, head: dict):
    """The task's ERNIE model: head sizes from the task, weights as `model.init` says."""
    check_choice("model.init", model_cfg.init, INITS)
    if model_cfg.init == "pretrained":
        return model_class.from_pretrained(model_cfg.pretrained_name, **head)
    if model_cfg.init == "checkpoint":
        return model_class.from_pretrained(str(_checkpoint_dir(model_cfg)), **head)
    return model_class(ernie_config(model_cfg, **head))


def load_finetuned(path: Path, model_class):
    """A checkpoint written by train.py."""
    if not (path / "config.json").is_file():
        raise MissingArtifactError(f"no fine-tuned checkpoint at {path}; run `python train.py` with the same task and model first")
    return model_class.from_pretrained(str(path))


def count_parameters(model) -> int:
    return int(sum(p.size for p in model.parameters()))
