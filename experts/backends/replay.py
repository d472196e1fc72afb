"""Replay backend: experts that answer from a recorded trace instead of running a model.

A replay expert (catalog weights `source: recorded`) stands for a real model on an outcome data
set (evals.outcomes, e.g. the 29 models of MMLU-Pro). For each question it answers "The answer is
(X)." where X is
- the model's recorded prediction, where the data has one;
- else the gold answer, where the model's recorded outcome is correct;
- else a fixed wrong choice (the first option letter that is not gold).
Questions are found by query id (the benchmark item id), else by the question text.

Each replay expert has the real model's size (`size_bytes`), so loading it costs simulated time:
bytes over tier bandwidths, disk -> host -> device, with byte budgets per tier. That lets the
whole pipeline (router, planner, loading, aggregation) run on real routing traces on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from experts.backends.base import GenerationRequest
from experts.catalog import Catalog, RecordedWeights
from orchestrator.errors import CoeError
from orchestrator.types import ExpertAnswer

LETTERS = "ABCDEFGHIJKLMNOP"


def fixed_wrong_choice(gold: str) -> str:
    return next(letter for letter in LETTERS if letter != gold)


@dataclass
class Trace:
    """Recorded answer letters of a data set: (questions, models)."""

    models: list[str]
    letters: np.ndarray  # object array of answer letters, shape (questions, models)
    row_of_id: dict[str, int]
    row_of_text: dict[str, int]

    @classmethod
    def from_outcomes(cls, name: str) -> Trace:
        from evals.outcomes import load_outcomes

        recorded = load_outcomes(name)
        data = recorded.data
        if recorded.gold is None:
            raise CoeError(f"outcome data {name!r} records no answers to replay",
                           "replay needs recorded predictions or gold answers (mmlu_pro has both)")
        letters = np.empty(data.outcomes.shape, dtype=object)
        for row, gold in enumerate(recorded.gold):
            for column in range(len(data.experts)):
                predicted = recorded.preds[row, column] if recorded.preds is not None else None
                if predicted is None:
                    correct = data.outcomes[row, column] >= 0.5  # NaN (did not answer) compares False
                    predicted = gold if correct else fixed_wrong_choice(gold)
                letters[row, column] = predicted
        row_of_text: dict[str, int] = {}
        for row, text in enumerate(data.texts):
            row_of_text.setdefault(text, row)
        return cls(models=list(data.experts), letters=letters, row_of_id={i: r for r, i in enumerate(data.ids)},
                   row_of_text=row_of_text)

    def answer(self, model: str, query_id: str | None, text: str) -> str | None:
        row = self.row_of_id.get(query_id) if query_id is not None else None
        if row is None:
            row = self.row_of_text.get(text)
        return None if row is None else self.letters[row, self.models.index(model)]


@dataclass
class TierSettings:
    """Byte budgets and bandwidths of a simulated GPU host (defaults: one H100 host)."""

    device_bytes: float = 80e9  # H100 HBM
    host_bytes: float = 1000e9  # host RAM set aside for expert weights
    host_to_device_bytes_per_s: float = 50e9  # PCIe Gen5 x16
    disk_to_host_bytes_per_s: float = 7e9  # NVMe


@dataclass
class LoadStats:
    loads: int = 0
    seconds: float = 0.0
    bytes_disk_to_host: float = 0.0
    bytes_host_to_device: float = 0.0


# --- MINIMAL STAND-IN for experts/pool.py (TieredPool + SimulatedMover, being built on branch
# `pool`): LRU residency per tier and seconds = bytes / bandwidth per hop. Replace with the pool
# on merge; nothing else depends on this class.
@dataclass
class SimulatedTiers:
    settings: TierSettings = field(default_factory=TierSettings)
    device: OrderedDict = field(default_factory=OrderedDict)  # name -> bytes, least recently used first
    host: OrderedDict = field(default_factory=OrderedDict)
    stats: LoadStats = field(default_factory=LoadStats)

    def load(self, name: str, size: float) -> float:
        """Make `name` resident on the device; returns the simulated seconds it took."""
        if name in self.device:
            self.device.move_to_end(name)
            return 0.0
        seconds = 0.0
        if name in self.host:
            self.host.move_to_end(name)
        else:
            seconds += size / self.settings.disk_to_host_bytes_per_s
            self.stats.bytes_disk_to_host += size
            if size <= self.settings.host_bytes:
                self._make_room(self.host, self.settings.host_bytes, size)
                self.host[name] = size
        seconds += size / self.settings.host_to_device_bytes_per_s
        self.stats.bytes_host_to_device += size
        if size <= self.settings.device_bytes:
            self._make_room(self.device, self.settings.device_bytes, size)
            self.device[name] = size
        else:  # larger than the device: it streams through all of it, loaded for each use, never kept
            self.device.clear()
        self.stats.loads += 1
        self.stats.seconds += seconds
        return seconds

    @staticmethod
    def _make_room(tier: OrderedDict, budget: float, size: float) -> None:
        while tier and sum(tier.values()) + size > budget:
            tier.popitem(last=False)


class ReplayBackend:
    name = "replay"

    def __init__(self, catalog: Catalog, **tier_options):
        self.catalog = catalog
        self.tiers = SimulatedTiers(TierSettings(**tier_options))
        self._traces: dict[str, Trace] = {}
        for spec in catalog.experts:
            if not isinstance(spec.weights, RecordedWeights):
                raise CoeError(f"the replay backend cannot run expert {spec.name!r}: its weights are not recorded",
                               "a replay catalog lists only experts with weights.source: recorded")
            if spec.weights.trace not in self._traces:
                self._traces[spec.weights.trace] = Trace.from_outcomes(spec.weights.trace)

    @property
    def stats(self) -> LoadStats:
        return self.tiers.stats

    def reset(self) -> None:
        """A cold start: every expert back on disk, statistics zeroed."""
        self.tiers = SimulatedTiers(self.tiers.settings)

    def load(self, expert: str) -> float:
        return self.tiers.load(expert, self.catalog.get(expert).size_bytes)

    def resident(self) -> dict[str, str]:
        return {name: "device" for name in self.tiers.device}

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        answers = []
        for request in requests:
            weights = self.catalog.get(request.expert).weights
            text = next(m.content for m in reversed(request.messages) if m.role == "user")
            letter = self._traces[weights.trace].answer(weights.model, request.query_id, text)
            if letter is None:
                raise CoeError(f"replay expert {request.expert!r} has no recorded answer for query {request.query_id!r}",
                               f"replay only the questions of {weights.trace!r}")
            answers.append(ExpertAnswer(expert=request.expert, text=f"The answer is ({letter})."))
        return answers
