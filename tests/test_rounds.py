"""evals/rounds.py: the order sides take in a round and the spread a benchmark states."""

import pytest

from evals.rounds import in_rounds, spread, turns


def test_sides_take_turns():
    assert [turns(("direct", "coe"), r) for r in range(3)] == [["direct", "coe"], ["coe", "direct"], ["direct", "coe"]]


def test_spread_keeps_each_round_and_its_range():
    assert spread([0.81, 0.6349, 0.7]) == {"per_round": [0.81, 0.635, 0.7], "min": 0.635, "median": 0.7, "max": 0.81}
    assert spread([12.34, 10.06], digits=1) == {"per_round": [12.3, 10.1], "min": 10.1, "median": 11.2, "max": 12.3}
    with pytest.raises(ValueError, match="no rounds"):
        spread([])


def test_in_rounds_runs_every_way_each_round_taking_turns():
    order: list[str] = []

    def way(name: str):
        return lambda: order.append(name) or {"run": len(order)}

    runs = in_rounds({"naive": way("naive"), "planned": way("planned")}, rounds=3)
    assert order == ["naive", "planned", "planned", "naive", "naive", "planned"]
    assert runs == {"naive": [{"run": 1}, {"run": 4}, {"run": 5}], "planned": [{"run": 2}, {"run": 3}, {"run": 6}]}
