"""Answer extraction and scoring per answer kind.

| kind | benchmarks | extracted | correct when |
|---|---|---|---|
| `choice` | MMLU, MMLU-Pro, ARC, MedMCQA | option letter: "The answer is (C)", "(C) ...", "C.", or the option's own text | the letter is gold |
| `number` | GSM8K | \\boxed{..}, "#### N", "The answer is N", else the last number; "12.0", "1,000" and "$5" normalised | equal numbers |
| `math` | MATH-500 | the last \\boxed{..} (nested braces), else "The answer is ..." | equal after LaTeX normalisation, or equal as numbers |
| `exact` | BBH | "The answer is ...", else the first line | equal ignoring case, spaces and a closing period; "(B)" also matches "B" |
| `judge` | MT-Bench | the answer text, kept for a judge | never scored here (a judge rates it) |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.data import Item
from core.prompts import LETTERS

KINDS = ("choice", "number", "math", "exact", "judge")

_ANSWER_IS = re.compile(r"answer is[:\s]*\(?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_kind(item: Item) -> str:
    """How an item is scored: from its benchmark where the data's answer_type is too coarse."""
    if item.benchmark == "mt_bench":
        return "judge"
    if item.benchmark == "math500":
        return "math"
    return {"choice": "choice", "number": "number"}.get(item.answer_type, "exact")


def _after_answer_is(text: str) -> str | None:
    """The rest of the line after the last "answer is" (a model may correct itself)."""
    matches = list(_ANSWER_IS.finditer(text))
    return text[matches[-1].end():].split("\n")[0].strip() if matches else None


def extract_choice(text: str, choices: list[str] | None = None) -> str | None:
    """The chosen option letter: "The answer is (C)", "(C) ...", "C.", or the option's own text."""
    valid = LETTERS[: len(choices)] if choices else LETTERS[:10]
    tail = _after_answer_is(text)
    for candidate in ([tail] if tail else []) + [text.strip()]:
        match = re.match(rf"\(?([{valid}])\)?(?:[\s.:,)]|$)", candidate)
        if match:
            return match.group(1)
    match = re.search(rf"\(([{valid}])\)", text)
    if match:
        return match.group(1)
    if choices:
        lowered = text.lower()
        hits = [LETTERS[i] for i, c in enumerate(choices) if c and c.strip().lower() in lowered]
        if len(hits) == 1:
            return hits[0]
    return None


def normalize_number(raw: str) -> str | None:
    raw = raw.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else f"{value:g}"


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), nested braces included."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unbalanced: the answer was cut off


def extract_number(text: str) -> str | None:
    """The final number: \\boxed{..}, "#### N", "The answer is N", else the last number."""
    found = [b for b in [boxed(text)] if b is not None] or re.findall(r"####\s*([^\n]*)", text)[-1:]
    if found:
        numbers = _NUMBER.findall(found[-1])
        if numbers:
            return normalize_number(numbers[-1])
    tail = _after_answer_is(text)
    if tail:
        numbers = _NUMBER.findall(tail)
        if numbers:
            return normalize_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# LaTeX that changes how an answer looks, not what it is.
_MATH_NOISE = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"^\circ", r"^{\circ}", r"\%", "%")


def normalize_math(answer: str) -> str:
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    for noise in _MATH_NOISE:
        s = s.replace(noise, "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-z]=", "", s)  # "x=5" -> "5"
    return s.replace(",\\!", ",").lower()


def extract_math(text: str) -> str | None:
    inside = boxed(text)
    if inside is not None:
        return normalize_math(inside)
    tail = _after_answer_is(text)
    if tail:
        return normalize_math(re.sub(r"[\s.]+$", "", tail))
    return None


def _as_number(s: str) -> float | None:
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac and int(frac.group(3)) != 0:
        return (-1 if frac.group(1) else 1) * int(frac.group(2)) / int(frac.group(3))
    value = normalize_number(s)
    return float(value) if value is not None and re.fullmatch(r"-?[\d,]*\.?\d+", s.replace(",", "")) else None


def math_equal(predicted: str, gold: str) -> bool:
    if predicted == gold:
        return True
    a, b = _as_number(predicted), _as_number(gold)
    return a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _normalize_text(text: str) -> str:
    return re.sub(r"[\s.!,;:'\"]+$", "", text.strip().lower()).strip()


def extract_exact(text: str) -> str:
    tail = _after_answer_is(text)
    raw = tail if tail is not None else (text.strip().split("\n") or [""])[0]
    if tail is not None and re.match(r"^[A-Z]\)", tail):  # _ANSWER_IS ate the opening parenthesis of "(B)"
        raw = "(" + tail
    return _normalize_text(raw)


def exact_equal(predicted: str, gold: str) -> bool:
    """BBH targets are exact strings; an option target "(B)" also accepts "B" and "(B) text"."""
    gold = _normalize_text(gold)
    if predicted == gold:
        return True
    option = re.fullmatch(r"\(([a-z])\)", gold)
    if option:
        match = re.match(r"\(?([a-z])\)?(?:[\s.:,]|$)", predicted)
        return bool(match) and match.group(1) == option.group(1)
    return False


@dataclass(frozen=True)
class Scored:
    predicted: str | None
    correct: bool | None  # None: not scored here (judge)


def score(item: Item, text: str, kind: str | None = None) -> Scored:
    kind = kind or answer_kind(item)
    if kind == "choice":
        predicted = extract_choice(text, item.choices)
        return Scored(predicted, predicted == item.answer)
    if kind == "number":
        predicted = extract_number(text)
        return Scored(predicted, predicted is not None and predicted == normalize_number(item.answer))
    if kind == "math":
        predicted = extract_math(text)
        return Scored(predicted, predicted is not None and math_equal(predicted, normalize_math(item.answer)))
    if kind == "exact":
        predicted = extract_exact(text)
        return Scored(predicted, exact_equal(predicted, item.answer))
    if kind == "judge":
        return Scored(None, None)
    raise ValueError(f"unknown answer kind {kind!r}; one of {KINDS}")


def is_correct(item: Item, text: str) -> bool:
    return bool(score(item, text).correct)


def extract(item: Item, text: str) -> str | None:
    return score(item, text).predicted
