"""What every backend offers the pipeline: generate for a batch of requests, stream one request,
and say what it holds."""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass(frozen=True)
class StreamPiece:
    """One step of a streamed generation: new text; the last piece carries the complete answer."""

    text: str = ""
    answer: ExpertAnswer | None = None


class Backend(Protocol):
    """Runs experts. Requests for several experts may arrive in one call; the backend batches them."""

    name: str
    pool: TieredPool | None  # the tiered memory pool holding its experts; None: the backend manages memory itself

    def generate(self, requests: list[GenerationRequest]) -> list[ExpertAnswer]:
        """One answer per request, in request order."""
        ...

    def stream(self, request: GenerationRequest) -> Iterator[StreamPiece]:
        """One request's text as it is generated: pieces in order (stop strings already cut, see
        StopScanner), then a last piece with empty text and the complete ExpertAnswer, whose text
        is the pieces joined (stripped). Closing the iterator early stops the generation.
        A backend built on an async engine (vLLM) bridges its async generator to this iterator."""
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


class StopScanner:
    """Streams text past stop strings: `feed` returns the text that can be sent now, holding back
    a tail that may still turn into a stop string; after a stop string, `stopped` is True.
    Leading whitespace is dropped, as non-streamed answers are stripped."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if not self.sent:
            self.text = self.text.lstrip()
        self.text, self.stopped = cut_at_stop(self.text, self.stops)
        held = 0 if self.stopped else self._partial_stop_length()
        ready = self.text[self.sent: len(self.text) - held]
        self.sent += len(ready)
        return ready

    def flush(self) -> str:
        """What is left at the end of the generation (a held tail that never became a stop)."""
        rest = self.text[self.sent:].rstrip()
        self.sent = len(self.text)
        return rest

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for size in range(min(longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
