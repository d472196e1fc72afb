"""Measuring in rounds: a serving benchmark measures its load several times and states the spread.

One short measured load on this shared 2-core machine moves by tens of percent between runs (a
background process, an engine's compile, the page cache), so a pooled figure alone cannot tell a
change from noise. Each benchmark repeats its measured block `--rounds` times, pools every
round's requests for the headline figure, and keeps each round's figure (`spread`) so that a
reader, and `evals.figures --against`, can tell whether a new run moved beyond it. Where the
sides being compared can run in the same phase they take turns (`turns`): drift in the machine's
load then hits both alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def turns(names: Sequence[str], round_: int) -> list[str]:
    """The order of the sides in a round: as given on even rounds, reversed on odd ones."""
    return list(names) if round_ % 2 == 0 else list(reversed(names))


def spread(values: Sequence[float], digits: int = 3) -> dict:
    """Each round's figure and their least, median and greatest."""
    if not values:
        raise ValueError("no rounds to state a spread of")
    return {"per_round": [round(v, digits) for v in values], "min": round(min(values), digits),
            "median": round(statistics.median(values), digits), "max": round(max(values), digits)}


def in_rounds(ways: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Each way measured `rounds` times, the ways taking turns; per way its runs, in round order."""
    runs: dict[str, list[dict]] = {name: [] for name in ways}
    for round_ in range(rounds):
        for name in turns(list(ways), round_):
            runs[name].append(ways[name]())
    return runs
