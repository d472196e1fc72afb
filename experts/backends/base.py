"""What every backend offers the pipeline: generate for a batch of requests, and say what it holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from orchestrator.types import ExpertAnswer, GenerationParams, Message

if TYPE_CHECKING:
    from experts.pool import TieredPool


@dataclass(frozen=True)
class GenerationRequest:
    expert: str
    messages: list[Message]
    params: GenerationParams
    query_id: str | None = None  # the query this answers (replay backends look recorded answers up by it)


class Backend(Protocol):
    """Runs experts. Requests for several experts may arrive in one call; the backend batches them."""

    name: str
    pool: TieredPool | None  # the tiered memory pool holding its experts; None: the backend manages memory itself

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """One answer per request, in request order."""
        ...

    def load(self, expert: str) -> float:
        """Make the expert ready to run; returns the seconds it took (0 when already resident)."""
        ...

    def resident(self) -> dict[str, str]:
        """Expert name -> where it lives now: `device` (instantiated and ready to run), `host` or `disk`."""
        ...


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut generated text before the first stop string; says whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
