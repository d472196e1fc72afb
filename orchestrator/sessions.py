"""Conversations that stay on their expert: which expert answered each session last.

A new turn's routing keeps the session's expert unless the turn's top expert is predicted better
by more than the margin (`sessions:` in the config). The store is plain Python (an LRU with a
time to live); on Serve every router replica reaches one shared store (deploy/app.py wraps this
one in a Ray actor), so a conversation keeps its expert whichever replica takes the turn.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from core.config import SessionConfig
from core.types import Decision


class SessionStore(Protocol):
    def get(self, sessions: list[str]) -> dict[str, str]: ...  # session -> its expert, for those known

    def put(self, experts: dict[str, str]) -> None: ...  # session -> the expert that answered it


class Sessions:
    def __init__(self, settings: SessionConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings or SessionConfig()
        self.clock = clock
        self._experts: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sessions: list[str]) -> dict[str, str]:
        now = self.clock()
        found = {}
        with self._lock:
            for session in sessions:
                entry = self._experts.get(session)
                if entry is not None and now - entry[1] <= self.settings.ttl_seconds:
                    found[session] = entry[0]
        return found

    def put(self, experts: dict[str, str]) -> None:
        now = self.clock()
        with self._lock:
            for session, expert in experts.items():
                self._experts[session] = (expert, now)
                self._experts.move_to_end(session)
            while len(self._experts) > self.settings.max_sessions:
                self._experts.popitem(last=False)


def keep_session_expert(decision: Decision, expert: str, margin: float) -> Decision:
    """The decision with the session's expert first, unless the top expert beats it by more than
    `margin` (or it is not among the decision's experts any more)."""
    scores = {s.expert: s.score for s in decision.ranked}
    top = decision.ranked[0]
    if expert not in scores or expert == top.expert or top.score - scores[expert] > margin:
        return decision
    ranked = [s for s in decision.ranked if s.expert == expert] + [s for s in decision.ranked if s.expert != expert]
    why = (f"{decision.explanation}; the conversation stays with {expert}: {top.expert} is not better by more "
           f"than {margin:g}")
    return decision.model_copy(update={"ranked": ranked, "explanation": why})
