"""Entity F1 against seqeval, and CMRC 2018 EM/F1 against hand-worked cases of the official evaluator's rules."""
from __future__ import annotations

import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

from ernie_lab.metrics import (
    accuracy,
    cmrc_em,
    cmrc_f1,
    cmrc_normalize,
    cmrc_scores,
    cmrc_segment,
    entity_f1,
    longest_common_run,
    tag_entities,
    word_tokenize,
)


def seqeval_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """seqeval's default (conlleval-compatible) scores, in the same keys and scale as entity_f1."""
    scores = {
        "precision": 100 * precision_score(gold, pred, zero_division=0),
        "recall": 100 * recall_score(gold, pred, zero_division=0),
        "f1": 100 * f1_score(gold, pred, zero_division=0),
    }
    types = sorted({t for t, _, _ in get_entities(gold)} | {t for t, _, _ in get_entities(pred)})
    if types:
        _, _, f1s, _ = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
        scores.update({f"f1_{t}": 100 * float(f) for t, f in zip(types, f1s)})
    return scores


def assert_matches_seqeval(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    ours = entity_f1(gold, pred)
    theirs = seqeval_scores(gold, pred)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key
    return ours


def test_accuracy_unchanged():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 75.0


def test_chunking_follows_conlleval():
    tags = ["B-PER", "I-LOC", "I-LOC", "O", "I-PER", "B-PER", "I-PER"]
    # B-PER alone (the type changes at 1); I-LOC after another type opens LOC 1-2; I-PER after O opens PER 4-4,
    # which B-PER closes; B-PER I-PER is PER 5-6, closed by the end of the sequence.
    expected = [("PER", 0, 0), ("LOC", 1, 2), ("PER", 4, 4), ("PER", 5, 6)]
    assert tag_entities(tags) == expected
    assert tag_entities(tags) == get_entities(tags)


def test_wrong_type_at_the_end_counts_as_a_miss():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"]]
    scores = assert_matches_seqeval(gold, pred)
    # gold {PER 0-1, LOC 3-3}, predicted {PER 0-1, ORG 3-3}: 1 correct of 2 predicted and 2 gold.
    assert scores["precision"] == 50.0
    assert scores["recall"] == 50.0
    assert scores["f1"] == 50.0
    assert scores["f1_PER"] == 100.0 and scores["f1_LOC"] == 0.0 and scores["f1_ORG"] == 0.0


def test_i_without_b_and_type_change_mid_entity():
    gold = [["I-PER", "I-PER", "O", "B-LOC", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]]
    scores = assert_matches_seqeval(gold, pred)
    # gold: I-PER I-PER opens PER 0-1; I-ORG after B-LOC closes LOC 3-3 and opens ORG 4-4 -> 3 entities.
    # predicted: PER 0-1, LOC 3-4 -> only PER matches. P = 1/2, R = 1/3, F1 = 2*(1/2)(1/3)/(5/6) = 0.4.
    assert scores["precision"] == pytest.approx(50.0)
    assert scores["recall"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(40.0)


def test_entities_do_not_cross_sentences():
    gold = [["O", "B-ORG"], ["I-ORG", "O"]]
    pred = [["O", "B-ORG"], ["O", "O"]]
    scores = assert_matches_seqeval(gold, pred)
    # ORG 1-1 ends with sentence 1; I-ORG opens a second ORG in sentence 2. 1 of 1 predicted is right, 1 of 2
    # gold is found: P = 100, R = 50, F1 = 2*1*0.5/1.5 = 66.67.
    assert scores["precision"] == 100.0
    assert scores["recall"] == 50.0
    assert scores["f1"] == pytest.approx(200 / 3)


def test_nothing_predicted_and_nothing_to_find():
    assert entity_f1([["O", "O"]], [["O", "O"]], types=("PER",)) == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_PER": 0.0,
    }


def test_fixed_types_are_always_reported():
    scores = entity_f1([["B-PER"]], [["B-PER"]], types=("PER", "ORG", "LOC"))
    assert scores == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "f1_LOC": 0.0, "f1_ORG": 0.0, "f1_PER": 100.0}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sentence 0"):
        entity_f1([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="2 gold sentences"):
        entity_f1([["O"], ["O"]], [["O"]])


def test_random_tag_sequences_match_seqeval():
    rng = random.Random(20240611)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    for _ in range(300):
        n_sentences = rng.randint(1, 4)
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(n_sentences)]
        # predictions: mostly the gold tags with some corrupted, so that many entities match
        pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in sentence] for sentence in gold]
        assert_matches_seqeval(gold, pred)


def test_random_iobes_and_odd_tags_match_seqeval():
    rng = random.Random(7)
    tags = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B", "B", "I"]
    for _ in range(200):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(1, 3))]
        pred = [[rng.choice(tags) for _ in sentence] for sentence in gold]
        assert_matches_seqeval(gold, pred)


# ---- CMRC 2018 -----------------------------------------------------------------------------------------------------

def test_normalize_removes_the_official_punctuation_only():
    assert cmrc_normalize("  《战国无双3》 ") == "战国无双3"
    assert cmrc_normalize("ABC，def") == "abcdef"
    # "……" is listed as one two-character item, which a per-character test never matches: "…" stays.
    assert cmrc_normalize("北京…") == "北京…"
    # whitespace is stripped before punctuation is removed, so a space behind a leading comma survives
    assert cmrc_normalize("， 北京") == " 北京"


def test_segment_splits_cjk_characters_and_keeps_latin_words_and_numbers():
    assert cmrc_segment("2015年iPhone 6s售价5,288元。") == [
        "2015", "年", "iphone", "6s", "售", "价", "5,288", "元",
    ]
    # "-" is removed without ending the Latin run, so "ω-force" is one word
    assert cmrc_segment("光荣和ω-force") == ["光", "荣", "和", "ωforce"]


@pytest.mark.parametrize(("text", "tokens"), [
    # as NLTK 3.10's word_tokenize splits them
    ('"cynomys mexicanus"', ["``", "cynomys", "mexicanus", "''"]),
    ("81.95%", ["81.95", "%"]),
    ("hilfe, ich bin ein junge", ["hilfe", ",", "ich", "bin", "ein", "junge"]),
    ("world's columbian exposition", ["world", "'s", "columbian", "exposition"]),
    ('mayhem."finally the game', ["mayhem", ".", "``", "finally", "the", "game"]),
    ('"p. cedrimontanus"', ["``", "p.", "cedrimontanus", "''"]),
    ("accrington f.c.", ["accrington", "f.c", "."]),
    ("1,000 km", ["1,000", "km"]),
    ("we cannot go", ["we", "can", "not", "go"]),
    ("don't stop", ["do", "n't", "stop"]),
    ("r.s.;", ["r.s", ".", ";"]),
    ("3.5 (approx.) ok", ["3.5", "(", "approx", ".", ")", "ok"]),
    ("abc. def", ["abc", ".", "def"]),
    ("'hello' world", ["'", "hello", "'", "world"]),
    ("  ", []),
])
def test_word_tokenize_matches_nltk(text, tokens):
    assert word_tokenize(text) == tokens


def test_longest_common_run_is_contiguous():
    assert longest_common_run(list("abcde"), list("xbcdy")) == 3  # "bcd"
    assert longest_common_run(list("abc"), list("axbxc")) == 1  # no two in a row
    assert longest_common_run([], list("abc")) == 0


def test_f1_and_em_hand_cases():
    # reference 光/荣/和/ωforce (4 tokens), prediction 光/荣: common run 2, P = 2/2, R = 2/4, F1 = 2/3
    assert cmrc_f1(["光荣和ω-force"], "光荣") == pytest.approx(2 / 3)
    assert cmrc_em(["光荣和ω-force"], "光荣") == 0.0
    # full-width hyphen is punctuation too: an exact match
    assert cmrc_em(["光荣和ω-force"], "光荣和ω－force") == 1.0
    # best reference wins: 北京市 (3 tokens) gives P = 1, R = 2/3, F1 = 0.8; 中国北京 gives 2/3
    assert cmrc_f1(["北京市", "中国北京"], "北京") == pytest.approx(0.8)
    # the space left after a leading comma fails EM but not F1 (whitespace is no token)
    assert cmrc_em(["北京"], "， 北京") == 0.0
    assert cmrc_f1(["北京"], "， 北京") == 1.0
    assert cmrc_f1(["北京"], "") == 0.0


def test_scores_average_and_scale():
    references = [["光荣和ω-force"] * 3, ["光荣和ω-force"]]
    predictions = ["光荣和ω－force", "光荣"]
    # EM: 1 and 0 -> 50; F1: 1 and 2/3 -> 83.33
    assert cmrc_scores(references, predictions) == pytest.approx({"em": 50.0, "f1": 250 / 3})
    with pytest.raises(ValueError, match="2 questions but 1 predictions"):
        cmrc_scores(references, predictions[:1])
