"""Reading the answer out of a free-text reply, without an LLM judge.

VLMEvalKit first tries exact matching and, where that fails, asks ChatGPT which option the reply
means. Here only deterministic rules are used, in order of how much they can be trusted:

1. the reply is just an option letter ("B", "(B)", "B.");
2. the reply starts with a letter and punctuation ("B. a dog", "(B) a dog", "B: ...");
3. an explicit phrase ("the answer is B", "option B", "答案是B", "选B");
4. exactly one valid option letter stands alone in the reply ("I pick B here"), ignoring "A" and
   "I" used as English words (followed by a lower-case word, as in "A dog is ...", but not "A is
   right" or "A or B");
5. exactly one option's text appears in the reply ("a dog" when option B is "dog"), preferring the
   longest of nested matches ("dark red" over "red"); skipped when the reply is much longer than
   all options together, where containment would be luck.

Anything else is unanswered (None) and scores as wrong, as VLMEvalKit's exact-matching mode does.
"""

from __future__ import annotations

import math
import re

_REFUSALS = ("cannot determine the answer", "i can't process this file", "sorry, i can't help with images")

_ALONE = re.compile(r"^\W*[\(\[（【]?\s*([A-Z])\s*[\)\]）】]?\W*$")
_LEADING = re.compile(r"^\s*[\(\[（【]?\s*([A-Z])\s*(?:[\)\]）】]|[.:：、．])")
_PHRASES = [
    re.compile(r"(?i:answer|option|choice)\s*(?i:is|would be|should be)?\s*[:：]?\s*[\(\[（]?([A-Z])(?![A-Za-z])"),
    re.compile(r"(?:答案|选项|正确选项|应选|选择|选)\s*(?:是|为|应该是|：|:)?\s*[\(\[（]?([A-Z])(?![A-Za-z])"),
]
# words after "A" that make it an option letter ("A is correct", "A or B") rather than an article
_LETTER_VERBS = {"is", "was", "or", "and", "seems", "looks", "appears", "should", "would", "could", "fits", "matches"}
_STANDALONE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a reply picks, or None when it cannot be told without a judge."""
    text = str(prediction or "").strip()
    if not text or not options:
        return None
    if any(r in text.lower() for r in _REFUSALS):
        return None
    letters = set(options)

    for pattern in (_ALONE, _LEADING):
        m = pattern.match(text)
        if m and m.group(1) in letters:
            return m.group(1)
    for pattern in _PHRASES:
        found = {m.group(1) for m in pattern.finditer(text)} & letters
        if len(found) == 1:
            return found.pop()

    standalone = set()
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter not in letters:
            continue
        if letter in "AI":
            following = re.match(r"\s+([a-z]+)", text[m.end():])
            if following and following.group(1) not in _LETTER_VERBS:
                continue  # the article "A" / pronoun "I" ("A dog runs"), not an option ("A is right")
        standalone.add(letter)
    if len(standalone) == 1:
        return standalone.pop()
    if len(standalone) > 1:
        return None

    return _match_option_text(text, options)


def _match_option_text(text: str, options: dict[str, str]) -> str | None:
    lowered = text.lower()
    texts = {k: str(v).strip().lower() for k, v in options.items() if str(v).strip()}
    if len(lowered) > 2 * sum(len(v) for v in texts.values()):
        return None
    hits = [k for k, v in texts.items() if v in lowered]
    # an option contained in another matched option ("red" in "dark red") is not a separate answer
    hits = [k for k in hits if not any(k != o and texts[k] in texts[o] for o in hits)]
    return hits[0] if len(hits) == 1 else None


def extract_yes_no(prediction: str) -> str:
    """"Yes", "No" or "Unknown": yes/no must appear as a word, and not both (as VLMEvalKit)."""
    words = re.sub(r"[^0-9a-z]+", " ", str(prediction or "").lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "Yes"
    if has_no and not has_yes:
        return "No"
    return "Unknown"


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def match_open_answer(prediction: str, answer: str) -> bool:
    """An open (no options) question: the answer appears in the reply as a whole word or number.

    Numbers compare by value ("3.50" matches "3.5"); text compares case-insensitively, and must
    not be part of a longer word or number ("5" does not match "15").
    """
    reply = str(prediction or "").strip().lower()
    gold = str(answer or "").strip().lower()
    if not reply or not gold:
        return False
    gold_number = _to_number(gold)
    if gold_number is not None:
        return any(
            math.isclose(v, gold_number, rel_tol=1e-6, abs_tol=1e-9)
            for v in (_to_number(m.group(0)) for m in _NUMBER.finditer(reply))
            if v is not None
        )
    return re.search(r"(?<![\w.])" + re.escape(gold) + r"(?!\w)", reply) is not None


def _to_number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
