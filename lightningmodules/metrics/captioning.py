"""Uni-Med report generation (``[caption]``): BLEU-1..4, METEOR and ROUGE as its eval_caption.py scores them.

The released flow (github.com/tsinghua-msiip/Uni-Med @ 63b9dfb), reproduced step by step:

1. Texts. The prediction is ``generated.lower().replace("<unk>", "").strip()`` (eval_caption.py:222,
   268). The reference is the report after the eval dataset's text processor, ``blip_caption_new``
   with its default ``max_words`` 50 (mimic_caption_dataset.py:85, medpix_dataset.py:78;
   uni_med/processors/blip_processors.py:92-106; eval_configs/uni_med_benchmark_evaluation.yaml names
   the processor): runs of 2+ whitespace become one space, then ``rstrip("\\n")``, ``strip(" ")``, and
   the text is cut to its first 50 space-separated words. ``reference_max_words=None`` turns the cut off.
2. Items whose prediction or reference is empty are left out of every score (evaluate_all,
   eval_caption.py:157); counted here as ``dropped_empty``.
3. BLEU-1..4: pycocoevalcap ``Bleu(4)`` on the PTB-tokenised raw texts (eval_caption.py:38-63):
   Stanford PTBTokenizer with ``-preserveLines -lowerCase``, punctuation tokens dropped; corpus level
   (n-gram matches and lengths summed over items, "closest" reference length, pycocoevalcap's 1e-15 /
   1e-9 guards). Articles are kept: no answer normalisation on this path.
4. METEOR: ``normalize_word`` (:func:`medcore.text.normalize_answer`) on both texts, PTB tokenisation,
   then METEOR 1.5 (``java -jar meteor-1.5.jar - - -stdio -l en -norm``), its corpus score
   (eval_caption.py:65-75).
5. ROUGE: the ``rouge`` package (pltrdy, 1.0.1; environment.yml pins it) ``Rouge().get_scores`` F
   values per item, averaged with numpy (eval_caption.py:77-108). ``calculate_meteor`` normalises
   the item dicts *in place* (eval_caption.py:66-68) and ``calculate_rouge`` normalises again, so
   ROUGE sees twice-normalised text (it differs from once only past 32 periods: ``normalize_word``
   strips at most 32 per call); items whose twice-normalised prediction or reference is empty are
   skipped (eval_caption.py:91-92). The package's scores: the text is split into sentences at ".",
   words at single spaces; with its default ``exclusive=True`` n-grams are *sets*; ROUGE-N =
   overlap of the n-gram sets; ROUGE-L (summary level) = |union of the words of the reconstructed
   LCS of every (reference sentence, prediction sentence) pair| over the numbers of distinct words;
   F = 2 P R / (P + R + 1e-8).

What runs where. PTB tokenisation (for BLEU and METEOR) and METEOR itself are Java programs shipped in
pycocoevalcap; there is no Python tokenizer that reproduces PTBTokenizer 3.4.1 token for token, and no
Python METEOR equal to METEOR 1.5 (WordNet synonyms, paraphrase table), so those two steps call
pycocoevalcap (``pip install 'medpipe[coco]'`` and Java on PATH; :class:`ScorerUnavailable` says which
is missing). BLEU and ROUGE are computed here and tested equal to pycocoevalcap's ``Bleu`` and the
``rouge`` package.

Deliberate difference: a carriage return, vertical tab, form feed or Unicode line / paragraph separator
inside a text becomes a space before tokenisation. The Java tokenizer ends a line there, and
pycocoevalcap's wrapper pairs output lines with items by position, so the script would score every
later item against the wrong text.

Not reproduced: eval_caption.py also prints ``f1_score`` (calculate_f1score on texts normalised a third
time); the VQA protocols compute that counting (``text_scores.token_prf``).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medcore.text import normalize_answer

__all__ = [
    "ScorerUnavailable",
    "coco_bleu",
    "meteor_score",
    "ptb_tokenize",
    "require_coco",
    "rouge_pkg_scores",
    "uni_med_prediction_text",
    "uni_med_reference_text",
    "uni_med_report_scores",
]

UNI_MED_REFERENCE_MAX_WORDS = 50  # BlipCaptionProcessor's default max_words (blip_processors.py:73)

_BLEU_TINY = 1e-15  # pycocoevalcap bleu_scorer.py: "so that if guess is 0 still return 0"
_BLEU_SMALL = 1e-9


class ScorerUnavailable(RuntimeError):
    """pycocoevalcap or Java, needed for PTB tokenisation and METEOR, is missing."""


def require_coco() -> None:
    """Raise :class:`ScorerUnavailable` (one line) unless pycocoevalcap and Java are both usable."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ScorerUnavailable(
            "Uni-Med report-generation scores need pycocoevalcap (pip install 'medpipe[coco]')"
        ) from None
    if shutil.which("java") is None:
        raise ScorerUnavailable(
            "Uni-Med report-generation scores need Java on PATH: pycocoevalcap runs the Stanford PTBTokenizer "
            "and METEOR 1.5 as Java programs (e.g. apt-get install default-jre-headless)"
        )


# ------------------------------------------------------------------------------------------ texts


def uni_med_prediction_text(generated: Any) -> str:
    """The prediction as eval_caption.py keeps it: lowercased, "<unk>" removed, stripped."""
    return "" if generated is None else str(generated).lower().replace("<unk>", "").strip()


_WHITESPACE_RUN = re.compile(r"\s{2,}")


def uni_med_reference_text(report: Any, max_words: int | None = UNI_MED_REFERENCE_MAX_WORDS) -> str:
    """The reference as the eval dataset's ``blip_caption_new`` processor gives it (see the module doc)."""
    text = _WHITESPACE_RUN.sub(" ", "" if report is None else str(report)).rstrip("\n").strip(" ")
    words = text.split(" ")  # single spaces only: "a\nb" stays one word, as in the processor
    if max_words is not None and len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


# Characters the Java tokenizer (-preserveLines) ends a line at, besides "\n", which the wrapper
# already replaces by a space. pycocoevalcap leaves them in, so one of them shifts every later item
# onto the wrong reference; here they become spaces too (a deliberate difference).
_JAVA_LINE_BREAKS = re.compile("[\r\x0b\x0c\u2028\u2029]")


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Java) on each text: lowercased PTB tokens, punctuation dropped."""
    if not texts:
        return []
    require_coco()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {i: [{"caption": _JAVA_LINE_BREAKS.sub(" ", text)}] for i, text in enumerate(texts)}
    tokenized = PTBTokenizer().tokenize(captions)
    if len(tokenized) != len(texts):  # PTBTokenizer zips output lines with ids and drops the rest
        raise RuntimeError(f"PTBTokenizer returned {len(tokenized)} lines for {len(texts)} texts")
    return [tokenized[i][0] for i in range(len(texts))]


# ------------------------------------------------------------------------------------------- BLEU


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def coco_bleu(hyps: Sequence[str], refs: Sequence[str], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as pycocoevalcap's ``Bleu(max_n).compute_score`` gives it, one reference per
    hypothesis, over whitespace tokens of already tokenised texts.

    Clipped n-gram matches and the hypothesis n-gram counts are summed over the corpus;
    BLEU-n = (prod_{k<=n} (matches_k + 1e-15) / (count_k + 1e-9)) ** (1 / n), times exp(1 - r / c) when
    the summed hypothesis length c is below the summed reference length r (with the same guards).
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    matches, counts = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hyps, refs, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len += len(h)
        ref_len += len(r)
        for n in range(1, max_n + 1):
            ref_counts = _ngram_counts(r, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in _ngram_counts(h, n).items())
            counts[n - 1] += max(0, len(h) - n + 1)
    scores, product = [], 1.0
    for n in range(max_n):
        product *= float(matches[n] + _BLEU_TINY) / (counts[n] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


# ------------------------------------------------------------------------------------------ METEOR


def meteor_score(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """METEOR 1.5's corpus score through pycocoevalcap's ``Meteor`` (a Java process), one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    require_coco()
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score({i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    finally:
        del scorer  # its __del__ ends the Java process
    return float(score)


# ------------------------------------------------------------------------------ ROUGE (rouge 1.0.1)


def _sentences(text: str) -> list[str]:
    # Rouge._get_scores: split at ".", keep non-empty pieces, collapse their whitespace (a piece of
    # spaces only becomes the empty sentence "")
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def _ngram_set(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> set[str]:
    """The words of the LCS the package reconstructs (backtracking from the end: a match is taken,
    else the reference index moves when that keeps a strictly longer LCS, else the hypothesis index)."""
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, start=1):
        row, above = table[i], table[i - 1]
        for j, h in enumerate(hyp, start=1):
            row[j] = above[j - 1] + 1 if r == h else max(above[j], row[j - 1])
    words: set[str] = set()
    i, j = len(ref), len(hyp)
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _f(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + 1e-8))


def rouge_pkg_scores(hyp: str, ref: str) -> dict[str, float]:
    """F of ROUGE-1, ROUGE-2 and ROUGE-L as ``rouge.Rouge().get_scores(hyp, ref)`` (pltrdy rouge 1.0.1,
    ``exclusive=True``) computes them. ValueError where the package raises (no sentence)."""
    hyp_s, ref_s = _sentences(hyp), _sentences(ref)
    if not hyp_s:
        raise ValueError("Hypothesis is empty.")
    if not ref_s:
        raise ValueError("Reference is empty.")
    hyp_w, ref_w = _words(hyp_s), _words(ref_s)
    out = {}
    for n in (1, 2):
        h, r = _ngram_set(hyp_w, n), _ngram_set(ref_w, n)
        overlap = len(h & r)
        out[f"rouge_{n}"] = _f(overlap / len(h) if h else 0.0, overlap / len(r) if r else 0.0)
    union: set[str] = set()
    for ref_sentence in ref_s:
        for hyp_sentence in hyp_s:
            union |= _lcs_words(ref_sentence.split(" "), hyp_sentence.split(" "))
    out["rouge_l"] = _f(len(union) / len(set(hyp_w)), len(union) / len(set(ref_w)))
    return out


# --------------------------------------------------------------------------------------- the set


def uni_med_report_scores(
    items: Iterable[Mapping[str, Any]],
    *,
    meteor: bool = True,
    reference_max_words: int | None = UNI_MED_REFERENCE_MAX_WORDS,
) -> dict[str, float]:
    """Uni-Med's report-generation scores (module docstring): ``bleu1``..``bleu4``, ``meteor`` (unless
    ``meteor=False``), ``rouge_1``, ``rouge_2``, ``rouge_l`` (the script's names), ``count`` (items
    scored) and ``dropped_empty``.

    ``items``: mappings with ``pred`` (the generated text) and ``gt`` (the reference report); ``id``
    names an item in errors. Raises :class:`ScorerUnavailable` when pycocoevalcap or Java is missing.
    """
    preds: list[str] = []
    refs: list[str] = []
    names: list[Any] = []
    dropped = 0
    for index, item in enumerate(items):
        pred = uni_med_prediction_text(item.get("pred"))
        ref = uni_med_reference_text(item.get("gt"), reference_max_words)
        if not pred or not ref:
            dropped += 1
            continue
        preds.append(pred)
        refs.append(ref)
        names.append(item.get("id", f"#{index}"))
    out = {"count": float(len(preds)), "dropped_empty": float(dropped)}
    if not preds:
        return out
    require_coco()
    bleu = coco_bleu(ptb_tokenize(preds), ptb_tokenize(refs), 4)
    out.update({f"bleu{n}": b for n, b in enumerate(bleu, start=1)})
    once_p = [normalize_answer(p) for p in preds]
    once_r = [normalize_answer(r) for r in refs]
    if meteor:
        out["meteor"] = meteor_score(ptb_tokenize(once_p), ptb_tokenize(once_r))
    rouge: dict[str, list[float]] = {"rouge_1": [], "rouge_2": [], "rouge_l": []}
    for name, p, r in zip(names, once_p, once_r, strict=True):
        p, r = normalize_answer(p), normalize_answer(r)
        if not p or not r:
            continue
        try:
            scores = rouge_pkg_scores(p, r)
        except ValueError as err:  # the script crashes here
            raise ValueError(f"record {name}: ROUGE of the normalised texts fails as in the script: {err}") from None
        for key, value in scores.items():
            rouge[key].append(value)
    if rouge["rouge_l"]:
        out.update({key: float(np.array(values).mean()) for key, values in rouge.items()})
    return out
