"""Answer extraction and scoring per answer type: choice letter, number, exact-match text."""

from __future__ import annotations

import re

from evals.data import Item
from evals.prompts import LETTERS

_ANSWER_IS = re.compile(r"answer is[:\s]*\(?\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _after_answer_is(text: str) -> str | None:
    matches = _ANSWER_IS.findall(text)
    return matches[-1].strip() if matches else None


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


def extract_number(text: str) -> str | None:
    """The final number: \\boxed{..}, "The answer is N", "#### N", else the last number."""
    for pattern in (r"\\boxed\{([^{}]*)\}", r"####\s*([^\n]*)"):
        found = re.findall(pattern, text)
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


def _normalize_text(text: str) -> str:
    return re.sub(r"[\s.!,;:'\"]+$", "", text.strip().lower()).strip("( )")


def extract_text(text: str) -> str:
    tail = _after_answer_is(text)
    return _normalize_text(tail if tail is not None else text.strip().split("\n")[0])


def extract(item: Item, text: str) -> str | None:
    if item.answer_type == "choice":
        return extract_choice(text, item.choices)
    if item.answer_type == "number":
        return extract_number(text)
    return extract_text(text)


def is_correct(item: Item, text: str) -> bool:
    predicted = extract(item, text)
    if predicted is None:
        return False
    if item.answer_type == "number":
        return predicted == normalize_number(item.answer)
    if item.answer_type == "choice":
        return predicted == item.answer
    return predicted == _normalize_text(item.answer)
