"""Turn the pre-tokenised text of WikiText and DailyDialog back into natural English.

Both releases were tokenised for word-level models: every token, punctuation included, is
separated by a space ("Say , Jim , how about it ?"), and WikiText also escapes the
symbols inside numbers ("1 @,@ 000", "2 @.@ 5", "role @-@ playing"). A byte-level BPE
model should learn to write normal English, so data preparation undoes this by default
(``--keep-tokenized`` keeps the release text as it is).

The rules work on the space-separated tokens of one line, deciding for each token whether
the space in front of it stays:

1. Number escapes: ``@-@`` -> ``-``, ``@,@`` -> ``,``, ``@.@`` -> ``.``, glued to both
   neighbours ("1 @,@ 000" -> "1,000").
2. Closing punctuation ``, . ; : ! ? % ) ] }`` and ellipses ("..." or ". . .") attach to
   the word before them; opening brackets ``( [ {`` attach to the word after them.
3. A currency sign before a number attaches to it ("$ 15" -> "$15").
4. Straight double quotes are paired within a line: the first of a pair opens (attaches
   to the next word), the second closes (attaches to the previous word). Curly quotes
   "“" and "”" say which they are.
5. Apostrophes: clitics written as their own token attach to the word before them
   (WikiText "don 't", "John 's", "O 'Brien"; DailyDialog "Let ' s", "I ’ m"), in lower
   case unless the word is in capitals (DailyDialog's "I ’ Ve" -> "I’ve"); a lone
   apostrophe after a word ending in "s" is a plural possessive ("fans ' votes" ->
   "fans' votes"); other lone apostrophes are paired as single quotes like rule 4.
6. WikiText headings " = = Gameplay = = " become "== Gameplay ==".
7. DailyDialog only: sentences that the release runs together ("right.But") get their
   space back ("right. But").

What is deliberately left alone, because the release text does not say what the original
was: spaced dashes ("5 – 6"), slashes ("Plus / minus"), and WikiText's ``<unk>``
placeholder (the tokenised release replaced rare words by it; the raw release has none).
The apostrophe characters themselves are kept as written (``'`` or ``’``).
"""

from __future__ import annotations

import re

_NUMBER_ESCAPES = {"@-@": "-", "@,@": ",", "@.@": "."}
_CLOSING = frozenset({",", ".", ";", ":", "!", "?", "%", ")", "]", "}", "...", "…", "”"})
_OPENING = frozenset({"(", "[", "{", "“"})
_CURRENCY = frozenset({"$", "£", "€", "¥", "₹", "US$"})
_APOSTROPHES = frozenset({"'", "’"})
# Endings that follow an apostrophe in English contractions and possessives.
_CLITICS = frozenset({"s", "t", "re", "m", "ve", "ll", "d"})
_RUN_TOGETHER = re.compile(r"(?<=[a-z])([.?!])(?=[A-Z][a-z])")
_HEADING = re.compile(r"^((?:= )+)(.*?)((?: =)+)$")


def _is_word(token: str) -> bool:
    return bool(token) and token[-1].isalnum()


def _clitic_case(word: str, clitic: str) -> str:
    """The clitic as it should follow ``word``: DailyDialog capitalises some ("I ’ Ve",
    "they ’ Ve"); only after a word in capitals ("DON ' T", "IBM ’ s") is it kept as written."""
    word = word.strip()
    shouted = len(word) > 1 and word.isupper()
    return clitic if shouted else clitic.lower()


def _join_tokens(tokens: list[str]) -> str:
    """Rules 1-5: rebuild one line from its space-separated tokens."""
    out: list[str] = []
    glue_next = False  # the next token attaches to the one before it
    double_open = False
    single_open = False
    i, n = 0, len(tokens)
    while i < n:
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < n else ""
        prev = out[-1] if out else ""
        space = bool(out) and not glue_next
        glue_next = False
        if token in _NUMBER_ESCAPES:
            token, space, glue_next = _NUMBER_ESCAPES[token], False, True
        elif token in _CLOSING:
            space = False
        elif token in _OPENING or (token in _CURRENCY and nxt[:1].isdigit()):
            glue_next = True
        elif token == '"':
            if double_open:
                space = False
            else:
                glue_next = True
            double_open = not double_open
        elif token in _APOSTROPHES:
            if _is_word(prev) and nxt.lower() in _CLITICS:  # "Let ' s" -> "Let's"
                token, space = token + _clitic_case(prev, nxt), False
                i += 1
            elif single_open:
                space, single_open = False, False
            elif _is_word(prev) and prev[-1] in "sS":  # "fans ' votes" -> "fans' votes"
                space = False
            else:
                glue_next, single_open = True, True
        elif token[:1] in _APOSTROPHES and _is_word(prev) and token[1:2].isalpha():
            space = False  # "don 't", "John 's", "O 'Brien"
        elif token == "n't" and _is_word(prev):
            space = False
        elif token == "." and prev.endswith("."):
            space = False  # ". . ." -> "..."
        out.append(" " + token if space else token)
        i += 1
    return "".join(out)


def _detokenize_line(line: str) -> str:
    return _join_tokens(line.split())


def detokenize_wikitext(text: str) -> str:
    """Natural text of WikiText release text (one or more lines).

    Each line is detokenised on its own and stripped of the release's padding spaces,
    so a blank line (a single space in the release) becomes an empty line; headings
    become "= Title =", "== Section ==", ... Line breaks are kept.
    """
    lines = []
    for line in text.split("\n"):
        stripped = line.strip()
        heading = _HEADING.match(stripped)
        if heading and heading.group(1).count("=") == heading.group(3).count("="):
            marks = "=" * heading.group(1).count("=")
            lines.append(f"{marks} {_detokenize_line(heading.group(2))} {marks}")
        else:
            lines.append(_detokenize_line(stripped))
    return "\n".join(lines)


def detokenize_dailydialog(text: str) -> str:
    """Natural text of one DailyDialog utterance (release text between two ``__eou__``)."""
    return _RUN_TOGETHER.sub(r"\1 ", _detokenize_line(text))
