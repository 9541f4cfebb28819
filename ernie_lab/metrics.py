"""Metrics, as the reference implementations define them. Values are percentages (0-100)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterator, Sequence


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    if len(gold) != len(predicted):
        raise ValueError(f"accuracy: {len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        return 0.0
    return 100.0 * sum(int(g == p) for g, p in zip(gold, predicted)) / len(gold)


# ---- entity-level precision / recall / F1 (MSRA_NER) ---------------------------------------------------------
# seqeval's default mode, which is conlleval's chunking: an I- (or E-) tag after O or after a tag of another type
# opens an entity, and a type change closes one. Sentences are joined with an "O" between them, as seqeval does
# for a list of sentences, so an entity never crosses a sentence boundary.


def _tag_parts(tag: str) -> tuple[str, str]:
    """(prefix letter, entity type); a tag without a type ("O", a bare "B") has the type "_"."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def tag_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of one tag sequence as (type, first index, last index), chunked the conlleval way."""
    entities = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        if not chunk:
            raise ValueError(f"empty tag at position {i}")
        tag, type_ = _tag_parts(chunk)
        if _ends_chunk(prev_tag, tag, prev_type, type_):
            entities.append((prev_type, begin, i - 1))
        if _starts_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return entities


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return 100.0 * precision, 100.0 * recall, 100.0 * f1


def entity_f1(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], types: Sequence[str] = ()
) -> dict[str, float]:
    """Micro-averaged entity precision/recall/F1 over sentences, plus `f1_<TYPE>` for every type that occurs
    (and for each of `types`, so a run always reports the same keys). Equals seqeval's default-mode scores."""
    if len(gold) != len(predicted):
        raise ValueError(f"entity_f1: {len(gold)} gold sentences but {len(predicted)} predicted")
    flat_gold: list[str] = []
    flat_pred: list[str] = []
    for i, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"entity_f1: sentence {i} has {len(g)} gold tags but {len(p)} predicted")
        flat_gold += [*g, "O"]
        flat_pred += [*p, "O"]
    gold_set = set(tag_entities(flat_gold))
    pred_set = set(tag_entities(flat_pred))
    correct = gold_set & pred_set
    precision, recall, f1 = _prf(len(correct), len(pred_set), len(gold_set))
    scores = {"precision": precision, "recall": recall, "f1": f1}
    n_correct, n_pred, n_gold = (Counter(e[0] for e in entities) for entities in (correct, pred_set, gold_set))
    for type_ in sorted(set(n_pred) | set(n_gold) | set(types)):
        scores[f"f1_{type_}"] = _prf(n_correct[type_], n_pred[type_], n_gold[type_])[2]
    return scores


# ---- CMRC 2018 exact match and F1 --------------------------------------------------------------------------
# As the official evaluator (ymcui/cmrc2018, baseline/cmrc2018_evaluate.py) defines them:
# * EM: after lower-casing, stripping outer whitespace and deleting CMRC_PUNCTUATION, the prediction equals one
#   of the references.
# * F1: both strings are segmented (each CJK character in U+4E00..U+9FA5 is one token; the text between them goes
#   through NLTK's word_tokenize), the longest common *contiguous* run of tokens gives precision and recall.
# * Each question scores its best reference; scores are averaged and scaled to 0-100.
# The official list also names "……" (two characters), which a per-character test never matches, so a lone "…"
# is kept; this code does the same.

CMRC_PUNCTUATION = frozenset("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")


def cmrc_normalize(text: str) -> str:
    """The official `remove_punctuation`: what EM compares."""
    return "".join(ch for ch in str(text).lower().strip() if ch not in CMRC_PUNCTUATION)


def cmrc_segment(text: str) -> list[str]:
    """The official `mixed_segmentation(text, rm_punc=True)`: what F1 compares."""
    tokens: list[str] = []
    run: list[str] = []
    for ch in str(text).lower().strip():
        if ch in CMRC_PUNCTUATION:
            continue
        if "\u4e00" <= ch <= "\u9fa5":
            if run:
                tokens += word_tokenize("".join(run))
                run = []
            tokens.append(ch)
        else:
            run.append(ch)
    if run:
        tokens += word_tokenize("".join(run))
    return tokens


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common contiguous subsequence (the official `find_lcs`)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_f1(references: Sequence[str], prediction: str) -> float:
    """Best F1 (0-1) of the prediction against any reference."""
    if not references:
        raise ValueError("cmrc_f1: a question needs at least one reference answer")
    predicted = cmrc_segment(prediction)
    best = 0.0
    for reference in references:
        gold = cmrc_segment(reference)
        common = longest_common_run(gold, predicted)
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cmrc_em(references: Sequence[str], prediction: str) -> float:
    """1.0 if the prediction equals any reference after normalisation, else 0.0."""
    predicted = cmrc_normalize(prediction)
    return float(any(cmrc_normalize(r) == predicted for r in references))


def cmrc_scores(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """EM and F1 (0-100) over questions, each question scored against its best reference."""
    if len(references) != len(predictions):
        raise ValueError(f"cmrc_scores: {len(references)} questions but {len(predictions)} predictions")
    if not predictions:
        return {"em": 0.0, "f1": 0.0}
    n = len(predictions)
    return {
        "em": 100.0 * sum(cmrc_em(r, p) for r, p in zip(references, predictions)) / n,
        "f1": 100.0 * sum(cmrc_f1(r, p) for r, p in zip(references, predictions)) / n,
    }


# ---- the word tokenizer the official F1 runs on non-CJK text ------------------------------------------------
# The official script calls nltk.word_tokenize: Punkt sentence splitting, then NLTK's Penn-Treebank-style word
# tokenizer on each sentence. NLTK is not a dependency here, so both steps are re-implemented for the text that can
# reach them: lower-cased, without CJK characters and without CMRC_PUNCTUATION (so no ":", "-", "*", "`", "“",
# "”" or "’"). It agrees with NLTK 3.10 (NLTKWordTokenizer after an untrained PunktSentenceTokenizer) on every
# non-CJK run of the CMRC 2018 train and dev files and on 200,000 random strings of the characters that matter.
# What it leaves out is Punkt's *trained* English model (its abbreviation list and collocations), which NLTK
# downloads separately: with it, a known abbreviation such as "u.s." or "var." followed by a word stays one token
# ("u.s.", "women"), here it splits ("u.s", ".", "women"). A handful of CMRC answers contain one; for those the
# token count, and so F1, can differ slightly from the official script's. EM does not tokenize, so it is exact.

_NON_WORD = ")\";}]*:@'({[\u2018\u2019\u201c\u201d\xab\xbb?!"  # characters Punkt never puts inside a word
_NOT_WORD_START = "(\"`{[:;&#*@)}]-,"
_NW = re.escape(_NON_WORD)
_PUNKT_WORD = re.compile(
    rf"\.{{2,}}|(?:\.\s){{2,}}\."
    rf"|[^\s{re.escape(_NOT_WORD_START)}]\S*?(?=\s|$|[{_NW}]|\.{{2,}}|,(?=$|\s|[{_NW}]|\.{{2,}}))"
    rf"|\S"
)
_SENTENCE_END = re.compile(rf"[.?!](?=(?P<after>[{_NW}]|\s+(?P<next>\S+)))")
_CLOSERS_AFTER_BREAK = re.compile(r"[\"')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|$)", re.MULTILINE)
_NUMBER = re.compile(r"-?[.,]?\d[\d,.-]*\.?")
_INITIAL = re.compile(r"[^\W\d]\.")


def _end_candidates(text: str) -> Iterator[tuple[re.Match, str]]:
    """Possible sentence ends with the text Punkt decides on (the word before, the end, the token after). Of
    several candidates inside one word only the last is kept. Punkt finds "the word before" by looking back for
    ASCII whitespace only, and reads a space at the very start of that stretch as none; both quirks are kept."""
    previous: tuple[re.Match, int, int] | None = None
    word_start, word_end = 0, 0
    for match in _SENTENCE_END.finditer(text):
        before = text[word_end : match.start()]
        space = max((i for i, ch in enumerate(before) if ch in " \t\n\r\x0b\x0c"), default=0)
        start = word_end + space + 1 if space else word_start
        if previous is not None and word_end <= start:
            yield previous[0], text[previous[1] : previous[2]] + previous[0].group() + previous[0].group("after")
        previous, word_start, word_end = (match, start, match.start()), start, match.start()
    if previous is not None:
        yield previous[0], text[previous[1] : previous[2]] + previous[0].group() + previous[0].group("after")


def _is_sentence_break(context: str) -> bool:
    """Punkt's decision: some token of the context ends a sentence and another token follows it. A number or a
    single-letter initial does not end one when the next token is lower case or ";:,.!?"-punctuation (in
    lower-cased text Punkt's orthographic evidence always says so)."""
    tokens = _PUNKT_WORD.findall(context)
    for token, following in zip(tokens, tokens[1:]):
        ends = token in (".", "?", "!") or (token.endswith(".") and not token.endswith(".."))
        if ends and (_NUMBER.fullmatch(token) or _INITIAL.fullmatch(token)):
            ends = not (following in ";:,.!?" or following[0].islower())
        if ends:
            return True
    return False


def _sentences(text: str) -> list[str]:
    spans, start = [], 0
    for match, context in _end_candidates(text):
        if _is_sentence_break(context):
            spans.append((start, match.end()))
            start = match.start("next") if match.group("next") is not None else match.end()
    spans.append((start, len(text.rstrip())))
    # closing quotes/brackets that open the next sentence belong to the one they close
    sentences, shift = [], 0
    for (begin, end), following in zip(spans, [*spans[1:], None]):
        begin, shift = begin + shift, 0
        closers = _CLOSERS_AFTER_BREAK.match(text[following[0] : following[1]]) if following else None
        if closers:
            sentences.append(text[begin : following[0] + len(closers.group().rstrip())])
            shift = closers.end()
        elif begin < end:
            sentences.append(text[begin:end])
    return sentences


_TREEBANK_RULES = [
    # opening quotes: a double quote at the start or after a space/opening bracket opens, "``"
    (re.compile(r"([«‘„])"), r" \1 "),
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'')"), r"\1 `` "),
    # an apostrophe opening a word that is not a clitic ('s, 're, ...)
    (re.compile(r"(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
    # the sentence-final period, with any closing brackets/quotes after it
    (re.compile(r"([^.])(\.)([\]\)}>\"'» ]*)\s*$"), r"\1 \2 \3 "),
    # commas not inside a number; ellipses; symbols; dashes
    (re.compile(r"(,)([^\d])"), r" \1 \2"),
    (re.compile(r"(,)$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&?!\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
]
_ENDING_RULES = [
    (re.compile(r"(»)"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('s|'m|'d|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'re|'ve|n't) "), r"\1 \2 "),
    (re.compile(r"\b(can)(not)\b"), r" \1 \2 "),
    (re.compile(r"\b(d)('ye)\b"), r" \1 \2 "),
    (re.compile(r"\b(gim|lem)(me)\b"), r" \1 \2 "),
    (re.compile(r"\b(gon)(na)\b"), r" \1 \2 "),
    (re.compile(r"\b(got)(ta)\b"), r" \1 \2 "),
    (re.compile(r"\b(more)('n)\b"), r" \1 \2 "),
    (re.compile(r"\b(wan)(na)(?=\s)"), r" \1 \2 "),
    (re.compile(r" ('t)(is|was)\b"), r" \1 \2 "),
]


def _treebank_tokens(sentence: str) -> list[str]:
    for pattern, replacement in _TREEBANK_RULES:
        sentence = pattern.sub(replacement, sentence)
    sentence = f" {sentence} "
    for pattern, replacement in _ENDING_RULES:
        sentence = pattern.sub(replacement, sentence)
    return sentence.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens of a lower-cased, CJK-free run of text, as nltk.word_tokenize splits it (see the notes above)."""
    return [token for sentence in _sentences(text) for token in _treebank_tokens(sentence)]
