"""What IFEval's checkers measure in a text: words, sentences, capitalised words and language.

The official IFEval checker counts words with NLTK's ``RegexpTokenizer(r"\\w+")``, sentences with
NLTK's trained English Punkt model, capitalised words among the tokens of ``nltk.word_tokenize``,
and detects languages with ``langdetect``. This module measures the same things without NLTK or
its model files:

- `count_words` is exact: runs of word characters.
- `split_sentences` follows Punkt's rules (where a sentence may end, which words before a dot are
  abbreviations, how numbered items and initials are read, closing quotes kept with their
  sentence), with Punkt's English abbreviations but without its table of how often each word is
  seen capitalised; on 7,273 varied English texts its count differs from Punkt's on 41 (0.6%),
  all around initials, numbered list items and abbreviations.
- `capital_words` cuts words as ``nltk.word_tokenize`` does where it matters for case (at
  punctuation, and contractions apart: "DON'T" is "DO" and "N'T", "I'm" is "I" and "'m"); on
  10,273 texts its count equals NLTK's on every one.
- `detect_language` is langdetect's, seeded: unseeded, langdetect may answer differently from one
  run to the next on a short or mixed text.

With ``official=True``, `count_sentences` and `capital_words` call NLTK itself, as the official
checker does; that needs ``pip install nltk`` and its ``punkt_tab`` model
(``python -m nltk.downloader punkt_tab``).
"""

from __future__ import annotations

import functools
import re

from itune.errors import UserError


def count_words(text: str) -> int:
    """The number of runs of word characters (letters, digits, underscore), as IFEval counts:
    "don't stop-loss 3.5" has 6 words.

    >>> count_words("don't stop-loss 3.5")
    6
    """
    return len(re.findall(r"\w+", text))


# Words that a dot after does not end a sentence after, unless a frequent sentence starter
# follows (Punkt's English abbreviations, less a few typographic oddities).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs inc ltd co corp cos jan feb aug sept sep oct nov dec fri wed "
    "tues gen col lt maj sen rep reps ft ave bros messrs yr ok adm capt cie chg mg ala ariz calif "
    "colo conn fla ga ill kan ky mich minn nev okla ore pa tenn va vt wash wis u.s u.k u.n u.s.a "
    "u.s.s.r a.m p.m ph.d d.c n.y l.a n.j n.c n.h n.m s.c w.va c d e f g h k l m n p r s t v w".split()
)
# Capitalised words that start a sentence even after an abbreviation or an ellipsis.
_SENTENCE_STARTERS = frozenset(
    "according although among both but despite even he however i if in indeed instead it many "
    "meanwhile moreover most nevertheless nonetheless nor separately similarly since so some the "
    "there these they this though thus under when while yet".split()
)
# Words after which a number and a dot ("3. Business") do not end a sentence.
_NUMBER_COLLOCATIONS = frozenset(
    "business commodities credit dividend financing insider international letters review who".split()
)
# Characters that may follow a sentence end with no space between: markdown emphasis, quotes,
# brackets and other punctuation. "Done.*" ends a sentence before the "*".
_GLUED = "*)\";}]:@'({[\u2018\u2019\u201c\u201d\xab\xbb!?"
# A possible sentence end: an ellipsis or a run of . ! ?, then a glued character or a space and
# more text (the end of the text needs no break).
_POSSIBLE_END = re.compile(r"(?:\.(?:\s?\.)+|[.!?]+)(?=[" + re.escape(_GLUED) + r"]|\s+\S)")
_TOKEN_BEFORE = re.compile(r"[^\s(\"`{\[:;&#*@)}\]\-,]\S*$|\S$")
_NEXT_WORD = re.compile(r"\s*[" + re.escape(_GLUED) + r"`]*(\S*)")
_WORD_BEFORE_INITIAL = re.compile(r"(\S+)\s+\S$")
_NUMBER = re.compile(r"-?[.,]?\d[\d,.\-]*")
# Closing quotes and brackets after a sentence end (and before a space) belong to that sentence.
_CLOSERS = re.compile(r"[\"')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)")


def _ends_sentence(text: str, end: re.Match) -> bool:
    mark = end.group()
    if mark[0] in "!?":
        return True
    following = _NEXT_WORD.match(text, end.end()).group(1)
    starter = following[:1].isupper() and following.strip(".,;:!?\"'").lower() in _SENTENCE_STARTERS
    if len(mark) > 1:  # an ellipsis
        return starter
    token = _TOKEN_BEFORE.search(text, max(0, end.start() - 60), end.start())
    word = token.group() if token else ""
    if word.lower() in _ABBREVIATIONS:
        return starter
    if len(word) == 1 and word.isalpha():
        # An initial: "J. R. Smith" and "Gordon A. Eadie" go on, "in class B. How" ends.
        if not following[:1].isupper() or re.fullmatch(r"[^\W\d]\.", following):
            return False
        before = _WORD_BEFORE_INITIAL.search(text, max(0, end.start() - 40), end.start())
        return before is not None and not (word.isupper() and before.group(1)[:1].isupper())
    if _NUMBER.fullmatch(word):
        return not following[:1].islower() and following.lower() not in _NUMBER_COLLOCATIONS
    return True


def split_sentences(text: str) -> list[str]:
    """The sentences of a text, read as the official IFEval checker's Punkt model reads them.

    A sentence may end at ".", "!" or "?" (or a run of them, or an ellipsis) followed by a space
    or by a character glued on, such as the ``*`` that closes markdown emphasis: ``*Done.* Next``
    is the sentences ``*Done.`` and ``* Next``. A dot does not end one after an abbreviation
    ("Dr.", "U.S."), an initial before a name ("J. Smith"), or an ellipsis, unless a frequent
    sentence starter ("The", "However") follows; nor after a number ("3.") before a lowercase
    word. Closing quotes and brackets stay with the sentence they close. Line breaks alone end
    no sentence, and a leftover piece of punctuation counts as one, as in Punkt:

    >>> split_sentences("Dr. Lee paid $3.50. Why? It's *fine.* Really")
    ['Dr. Lee paid $3.50.', 'Why?', "It's *fine.", '* Really']
    >>> split_sentences('He said "stop." Then he left... at noon.')
    ['He said "stop."', 'Then he left... at noon.']
    """
    pieces, start = [], 0
    for end in _POSSIBLE_END.finditer(text):
        if _ends_sentence(text, end):
            pieces.append(text[start : end.end()])
            start = end.end()
    pieces.append(text[start:])
    for i in range(1, len(pieces)):
        closers = _CLOSERS.match(pieces[i])
        if closers:
            pieces[i - 1] += closers.group()
            pieces[i] = pieces[i][closers.end() :]
    return [p.strip() for p in pieces if p.strip()]


# Where ``nltk.word_tokenize`` always cuts a word: spaces, quotes, brackets, most punctuation,
# dash runs, ellipses, and a comma or colon not inside a number.
_WORD_CUTS = re.compile(
    r"[\s\"`\u00ab\u00bb\u201c\u201d\u2018\u2019\u201e;@#$%&?!*\[\](){}<>\u2012-\u2015]+"
    r"|--+|\.{2,}|[:,](?!\d)"
)
# Contractions split from their word ("DO" + "N'T"), in the two cases NLTK knows.
_CONTRACTION = re.compile(r"(?<=[^'])('[sSmMdD]|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T)$")
_FUSED = re.compile(
    r"(?i)(can)(not)|(gim)(me)|(gon)(na)|(got)(ta)|(lem)(me)|(wan)(na)|(d)('ye)|(more)('n)"
)


def capital_words(text: str, *, official: bool = False) -> list[str]:
    """The words of a text written in capitals (each cased letter upper), split as the official
    checker's ``nltk.word_tokenize`` splits them: a hyphenated word is one word, a contraction
    two, and "I" counts:

    >>> capital_words("I'm sure the WELL-KNOWN NASA team DON'T mind: U.S. AI/ML")
    ['I', 'WELL-KNOWN', 'NASA', 'DO', "N'T", 'U.S.', 'AI/ML']

    With ``official=True``, ``nltk.word_tokenize`` itself (see `official_nltk`).
    """
    if official:
        return [w for w in official_nltk().word_tokenize(text) if w.isupper()]
    words = []
    for piece in _WORD_CUTS.split(text):
        bare = piece.rstrip(".")  # a sentence's final dot is cut off too
        fused = _FUSED.fullmatch(bare)
        contraction = _CONTRACTION.search(bare)
        if fused:
            words += [part for part in fused.groups() if part]
        elif contraction and contraction.start() > 0:
            words += [bare[: contraction.start()], contraction.group()]
        elif bare:
            words.append(piece if "." in bare else bare)
    return [w for w in words if w.isupper()]


def count_sentences(text: str, *, official: bool = False) -> int:
    """The number of `split_sentences`; with ``official=True``, of NLTK's English Punkt model."""
    if official:
        return len(official_nltk().sent_tokenize(text))
    return len(split_sentences(text))


@functools.cache
def official_nltk():
    """NLTK, checked to have the English Punkt model that the official checker counts sentences
    with; a UserError saying how to install what is missing."""
    try:
        import nltk
    except ImportError:
        raise UserError(
            "official IFEval scoring counts sentences and words with NLTK, which is not "
            "installed: pip install nltk && python -m nltk.downloader punkt_tab"
        ) from None
    try:
        nltk.sent_tokenize("A test.")
    except LookupError:
        raise UserError(
            "official IFEval scoring needs NLTK's English Punkt model: "
            "python -m nltk.downloader punkt_tab"
        ) from None
    return nltk


@functools.cache
def _language_detector_factory():
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(0)
    return factory


@functools.cache
def languages() -> frozenset[str]:
    """The language codes langdetect can name ("en", "fr", "zh-cn", ...)."""
    import os

    from langdetect.detector_factory import PROFILES_DIRECTORY

    return frozenset(name for name in os.listdir(PROFILES_DIRECTORY) if not name.startswith("."))


def detect_language(text: str) -> str | None:
    """The language code langdetect gives the text, seeded so that it gives the same each time;
    None where it finds nothing to go on (no letters)::

        detect_language("Bonjour tout le monde, comment allez-vous ?") == "fr"
    """
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_detector_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None
