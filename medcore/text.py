"""Answer normalisation shared by the LLaVA-Med, Med-MoE, Uni-Med and MedPLIB scoring scripts.

Scoring uses it, and so do the readers (a release without answer types: yes / no answers are closed).
This is the VQA-v2 evaluation normalisation (``normalize_word`` in those repositories), reproduced
behaviour for behaviour so that scores computed here match the published scripts.
"""

from __future__ import annotations

import re

__all__ = ["ARTICLES", "CONTRACTIONS", "NUMBER_WORDS", "PUNCTUATION", "normalize_answer", "tokens"]

# The standard VQA contraction map. Its capitalised keys (Im, Ive, Id've, I'dve) are left out:
# the scripts look tokens up after lowercasing, so those keys can never match.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

PUNCTUATION: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# "(?!<=\d)" is a (harmless) typo for a lookbehind in the original; kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The scripts call period_strip.sub("", text, re.UNICODE): the flag lands in `count`, so at most
# 32 periods are removed. Reproduced so long texts normalise exactly as in the scripts.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    # Decided per mark for the whole string, as the VQA evaluation does: if a mark touches a space
    # anywhere (or the text has a digit,digit pattern anywhere) every occurrence of that mark is
    # deleted; otherwise every occurrence becomes a space. Tested on the original text.
    has_number_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if has_number_comma or (mark + " " in text) or (" " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the four papers' scripts do.

    Punctuation handling, then lowercase, number words to digits ("none" -> "0"), articles
    dropped, contractions expanded, single spaces. ``None`` becomes "" and non-strings are cast.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    words = []
    for word in _process_punctuation(text).lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def tokens(text: str) -> list[str]:
    """Whitespace tokens of the normalised text."""
    return normalize_answer(text).split()
