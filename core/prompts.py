"""Prompt and answer templates, in one place: training, the expert table, evaluation runs and
routing all see a question exactly as a user would type it."""

from __future__ import annotations

from core.data import Item

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


# What an evaluation run adds to the user prompt, per answer kind (evals.scoring). Empty where the
# embedded experts were trained on the bare question: an instruction they never saw only hurts.
EVAL_INSTRUCTIONS = {
    "choice": "",
    "number": "",
    "exact": "",
    "math": "\n\nGive the final answer in \\boxed{}.",
    "judge": "",
}

JUDGE_PROMPT = """[Instruction]
You are an impartial judge. Rate the quality of the AI assistant's answer to the user's question below: its helpfulness, relevance, accuracy, depth and level of detail. {reference_note}Explain briefly, then give a rating from 1 to 10 in exactly this format: "Rating: [[5]]".

[Question]
{question}
{reference}
[The Start of Assistant's Answer]
{answer}
[The End of Assistant's Answer]"""


def eval_prompt(item: Item, kind: str) -> str:
    """The first user message of an evaluation run: the user prompt and the kind's instruction."""
    return user_prompt(item) + EVAL_INSTRUCTIONS[kind]


def judge_prompt(question: str, answer: str, reference: str | None = None) -> str:
    """MT-Bench single-answer grading (after FastChat's llm_judge), one turn at a time."""
    return JUDGE_PROMPT.format(
        question=question, answer=answer,
        reference_note="Compare it with the reference answer. " if reference else "",
        reference=f"\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n" if reference else "",
    )
