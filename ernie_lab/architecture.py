"""The ERNIE architecture a `model` config describes, and the vocabulary file it reads: shared by model building
(ernie_lab.modeling) and the packaged weights' conversion (ernie_lab.weights), which sits below it."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ernie_lab.errors import ConfigError, DataError

ARCH_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "task_type_vocab_size", "use_task_id", "initializer_range",
)
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")


def check_vocab(vocab: Path, vocab_size: int) -> None:
    """A vocabulary the tokenizer and the embedding table can use: UTF-8, the special tokens present, and no
    token id (its line number) beyond the model's vocab_size, which would index past the embedding table."""
    if not vocab.is_file():
        raise ConfigError(f"vocabulary not found: {vocab} (set paths.data_dir or model.vocab_file)")
    raw = vocab.read_bytes()
    try:
        tokens = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{vocab}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if tokens and tokens[-1] == "":
        tokens.pop()  # the final newline
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise DataError(f"vocabulary {vocab} lacks the special tokens {', '.join(missing)}")
    if len(tokens) > vocab_size:
        raise ConfigError(f"vocabulary {vocab} has {len(tokens)} tokens but model.vocab_size={vocab_size}")


def ernie_config(model_cfg: DictConfig, **head):
    from paddlenlp.transformers import ErnieConfig

    return ErnieConfig(**{k: model_cfg[k] for k in ARCH_KEYS}, **head)
