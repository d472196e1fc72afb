"""Prompt and answer templates, in one place: training, the expert table, evaluation runs and
routing all see a question exactly as a user would type it."""

from __future__ import annotations

from evals.data import Item

LETTERS = "ABCDEFGHIJKLMNOP"


def user_prompt(item: Item) -> str:
    """The question as a user would send it: multiple-choice options listed with letters."""
    return format_question(item.question, item.choices)


def format_question(question: str, choices: list[str] | None) -> str:
    if not choices:
        return question
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{question}\n\n{options}"


def target_answer(item: Item) -> str:
    """What an expert trained on this item answers: its reasoning where the data has it, then
    one closing sentence that answer extraction reads."""
    if item.answer_type == "choice" and item.choices:
        index = LETTERS.index(item.answer)
        return f"The answer is ({item.answer}) {item.choices[index]}."
    if item.solution:
        reasoning = strip_calculator_notes(item.solution.split("####")[0]).strip()
        return f"{reasoning}\nThe answer is {item.answer}."
    return f"The answer is {item.answer}."


def strip_calculator_notes(text: str) -> str:
    """GSM8K solutions carry calculator annotations like <<48/2=24>>; people don't write them."""
    import re

    return re.sub(r"<<[^>]*>>", "", text)
