"""Answer extraction per answer kind, on the tricky answers models really write."""

import pytest

from core.data import Item
from core.prompts import eval_prompt, judge_prompt
from evals.benchmarks import BENCHMARKS, benchmark_items, fitted_ids, get_benchmark
from evals.runner import parse_rating
from evals.scoring import answer_kind, score


def item(benchmark="t", answer_type="text", **fields):
    return Item(id="x", benchmark=benchmark, category="c", question="q", answer_type=answer_type, **fields)


CHOICE = item(answer_type="choice", choices=["red", "green", "blue", "yellow"], answer="C")


@pytest.mark.parametrize("text, predicted", [
    ("The answer is (C)", "C"), ("The answer is (C) blue.", "C"), ("the answer is: C", "C"), ("C.", "C"),
    ("(C) blue", "C"), ("I pick blue", "C"), ("Let me think. The answer is (B).", "B"),
    ("The answer is (A). Wait, no: the answer is (C).", "C"), ("no idea", None),
])
def test_choice_letters(text, predicted):
    assert score(CHOICE, text).predicted == predicted
    assert score(CHOICE, text).correct == (predicted == "C")


NUMBER = item(benchmark="gsm8k", answer_type="number", answer="12")


@pytest.mark.parametrize("text, correct", [
    ("\\boxed{12}", True), ("12.0", True), ("The answer is 12.", True), ("She has 3 + 9 = 12 apples.\n#### 12", True),
    ("$12.00", True), ("The answer is 12 apples, not 13.", True), ("First 5, then 7, total \\boxed{12.00}", True),
    ("12.5", False), ("The answer is 13.", False), ("no number", False),
])
def test_numbers(text, correct):
    assert score(NUMBER, text).correct is correct


def test_number_with_thousands_separator():
    assert score(item(benchmark="gsm8k", answer_type="number", answer="1200"), "The answer is 1,200.").correct


MATH = item(benchmark="math500", answer="\\left( 3, \\frac{\\pi}{2} \\right)")


@pytest.mark.parametrize("text, correct", [
    ("so the point is \\boxed{(3,\\dfrac{\\pi}{2})}.", True),
    ("\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", True),
    ("\\boxed{(3, \\pi)}", False),
    ("\\boxed{(3, \\frac{\\pi}{2}", False),  # cut off: unbalanced braces
])
def test_math_boxed_with_nested_braces(text, correct):
    assert score(MATH, text).correct is correct


def test_math_numbers_compare_by_value():
    half = item(benchmark="math500", answer="\\frac{1}{2}")
    assert score(half, "\\boxed{0.5}").correct and score(half, "The answer is $\\frac12$.").correct
    assert score(item(benchmark="math500", answer="10"), "\\boxed{10.0}").correct
    assert score(item(benchmark="math500", answer="90^\\circ"), "\\boxed{90}").correct
    assert not score(half, "\\boxed{2}").correct


@pytest.mark.parametrize("gold, text, correct", [
    ("(B)", "The answer is (B).", True), ("(B)", "B", True), ("(B)", "(C)", False),
    (")", ")", True), (")", "The answer is ).", True), ("] ]", "] ]", True),
    ("Yes", "yes", True), ("Yes", "The answer is Yes.", True), ("Yes", "No", False),
    ("valid", "invalid", False), ("False", "False\nbecause ...", True),
])
def test_bbh_exact_match(gold, text, correct):
    assert score(item(benchmark="bbh", answer=gold), text).correct is correct


def test_mt_bench_is_left_for_a_judge():
    mt = item(benchmark="mt_bench", answer="", turns=["Write a poem.", "Shorter."])
    assert answer_kind(mt) == "judge" and score(mt, "Roses are red.").correct is None
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0 and parse_rating("I would give it 7") is None
    prompt = judge_prompt("Write a poem.", "Roses are red.", reference="A poem.")
    assert "Roses are red." in prompt and "[[5]]" in prompt and "Reference" in prompt


def test_kinds_and_prompts_per_benchmark():
    assert {b.kind for b in BENCHMARKS.values()} == {"choice", "number", "math", "exact", "judge"}
    assert get_benchmark("MMLU-Pro").name == "mmlu_pro" and get_benchmark("arc").name == "arc_challenge"
    for bench in BENCHMARKS.values():
        first = benchmark_items(bench)[0]
        assert answer_kind(first) == bench.kind, bench.name
        assert eval_prompt(first, bench.kind).startswith(first.question)
    assert "\\boxed{}" in eval_prompt(benchmark_items(BENCHMARKS["math500"])[0], "math")


def test_runs_leave_out_what_experts_and_routers_were_fitted_on():
    fitted = fitted_ids()
    for name in ("medmcqa", "bbh", "mt_bench"):
        bench = BENCHMARKS[name]
        kept = benchmark_items(bench)
        assert kept and not fitted & {i.id for i in kept}
        assert len(benchmark_items(bench, include_fitted=True)) > len(kept)
    assert len(benchmark_items(BENCHMARKS["gsm8k"])) == 1319  # GSM8K test was never fitted on
