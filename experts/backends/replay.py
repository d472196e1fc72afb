"""Replay backend: experts that answer from a recorded trace instead of running a model.

A replay expert (catalog weights `source: recorded`) stands for a real model on an outcome data
set (e.g. the 29 models of MMLU-Pro; evals/replay.py reads the trace and hands it in). For each question it answers "The answer is
(X)." where X is
- the model's recorded prediction, where the data has one;
- else the gold answer, where the model's recorded outcome is correct;
- else a fixed wrong choice (the first option letter that is not gold).
Questions are found by query id (the benchmark item id), else by the question text.

Each replay expert has the real model's size (`size_bytes`) and lives in the tiered pool, whose
SimulatedMover costs every move from its bytes and the tier bandwidths (disk -> host -> device,
byte budgets per tier, plan-aware eviction). That lets the whole pipeline (router, planner, pool,
aggregation) run on real routing traces on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.catalog import Catalog, RecordedWeights
from core.config import PoolConfig
from core.errors import CoeError
from core.types import ExpertAnswer, GenerationRequest
from experts.backends.base import MicroBatching
from experts.pool import GB, SimulatedMover, TierBudgets, TieredPool

LETTERS = "ABCDEFGHIJKLMNOP"
REPLAY_DEVICE_BYTES = 8 * 80 * GB  # one 8 x H100 (80 GB) host: room for the largest recorded model
REPLAY_HOST_BYTES = 2000 * GB  # its host RAM for expert weights


def fixed_wrong_choice(gold: str) -> str:
    return next(letter for letter in LETTERS if letter != gold)


@dataclass
class Trace:
    """Recorded answer letters of a data set: (questions, models)."""

    models: list[str]
    letters: np.ndarray  # object array of answer letters, shape (questions, models)
    row_of_id: dict[str, int]
    row_of_text: dict[str, int]

    def answer(self, model: str, query_id: str | None, text: str) -> str | None:
        row = self.row_of_id.get(query_id) if query_id is not None else None
        if row is None:
            row = self.row_of_text.get(text)
        return None if row is None else self.letters[row, self.models.index(model)]


class ReplayBackend(MicroBatching):
    """Replay experts in a tiered pool (experts/pool.py) whose SimulatedMover accounts each move's
    seconds from its bytes and the tier bandwidths. Budgets: `device_bytes` / `host_bytes`, else
    the config's pool budgets, else one 8 x H100 host (REPLAY_DEVICE_BYTES, REPLAY_HOST_BYTES):
    the machine's own memory means nothing for experts that are never instantiated."""

    name = "replay"

    def __init__(self, catalog: Catalog, traces: dict[str, Trace] | None = None, pool: PoolConfig | None = None,
                 device_bytes: int | None = None, host_bytes: int | None = None, host_to_device_gbps: float = 50.0,
                 disk_to_host_gbps: float = 7.0):
        """`traces`: the recorded answers by data set name (evals.replay.load_trace), one for every
        trace the catalog's experts name."""
        self.catalog = catalog
        self.budgets = TierBudgets(device=device_bytes or (pool and pool.device_bytes) or REPLAY_DEVICE_BYTES,
                                   host=host_bytes or (pool and pool.host_bytes) or REPLAY_HOST_BYTES)
        self.mover = SimulatedMover(host_to_device_gbps=host_to_device_gbps, device_to_host_gbps=host_to_device_gbps,
                                    disk_to_host_gbps=disk_to_host_gbps)
        self._traces = dict(traces or {})
        for spec in catalog.experts:
            if not isinstance(spec.weights, RecordedWeights):
                raise CoeError(f"the replay backend cannot run expert {spec.name!r}: its weights are not recorded",
                               "a replay catalog lists only experts with weights.source: recorded")
            if spec.weights.trace not in self._traces:
                raise CoeError(f"replay expert {spec.name!r} names the trace {spec.weights.trace!r}, which was not handed in",
                               "build the backend with traces={name: evals.replay.load_trace(name)}")
        self.reset()

    def reset(self) -> None:
        """A cold start: every expert back on disk, statistics zeroed."""
        self.pool = TieredPool(self.budgets, self.mover)
        self.pool.add_catalog(self.catalog)

    def load(self, expert: str) -> float:
        return self.pool.ensure(expert)

    def resident(self) -> dict[str, str]:
        return {name: tier for name, tier in self.pool.residence().items() if tier != "disk"}

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
