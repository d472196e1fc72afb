"""The vLLM backend's residency logic: sleep/wake as the host tier on a GPU, engine stop on CPU,
and the pool-facing mover. The engine here records calls: sleep mode only works on a GPU (a
CPU engine ignores it), so this checks the backend's decisions; the real engine paths are
covered by test_backend_vllm.py, and sleep/wake itself needs a GPU machine."""

from dataclasses import dataclass

import pytest

from experts.backends.vllm import VLLMBackend, VLLMMover, _Engine, lora_id

BASE = "smollm2-135m"


class RecordingEngine:
    def __init__(self):
        self.calls: list[tuple] = []

    async def sleep(self, level=1):
        self.calls.append(("sleep", level))

    async def wake_up(self, tags=None):
        self.calls.append(("wake_up",))
        return True

    async def remove_lora(self, lora_int_id):
        self.calls.append(("remove_lora", lora_int_id))
        return True

    def shutdown(self):
        self.calls.append(("shutdown",))


@dataclass(frozen=True)
class Move:  # the fields of experts.pool.Move that a mover reads
    expert: str
    source: str
    target: str


@pytest.fixture
def backend(catalog):
    backend = VLLMBackend(catalog)
    yield backend
    backend._engines.clear()
    backend.shutdown()


def with_engine(backend, can_sleep):
    engine = RecordingEngine()
    backend._engines[BASE] = _Engine(engine, tokenizer=None, start_seconds=1.0, can_sleep=can_sleep)
    backend._engines[BASE].adapters.add("smollm2-math")
    return engine


def test_on_a_gpu_offload_sleeps_and_load_wakes(backend):
    engine = with_engine(backend, can_sleep=True)
    backend.offload(BASE)
    assert engine.calls == [("sleep", 1)]
    assert backend.resident() == {BASE: "host", "smollm2-math": "host"}
    backend.offload(BASE)  # already asleep: nothing to do
    assert backend.load("smollm2-math") >= 0 and engine.calls == [("sleep", 1), ("wake_up",)]
    assert backend.resident() == {BASE: "device", "smollm2-math": "device"}
    assert backend.load(BASE) == 0.0  # awake: free


def test_on_a_cpu_offload_stops_the_engine(backend):
    engine = with_engine(backend, can_sleep=False)
    backend.offload(BASE)
    assert engine.calls == [("shutdown",)] and backend.resident() == {}


def test_mover_maps_pool_moves_to_engine_calls(backend):
    engine = with_engine(backend, can_sleep=True)
    mover = VLLMMover(backend)
    mover.move(Move(BASE, "device", "host"))
    mover.move(Move(BASE, "host", "device"))
    mover.move(Move("smollm2-math", "host", "disk"))
    assert engine.calls == [("sleep", 1), ("wake_up",), ("remove_lora", lora_id("smollm2-math"))]
    assert backend.resident() == {BASE: "device"}
    mover.move(Move(BASE, "device", "disk"))
    assert engine.calls[-1] == ("shutdown",) and backend.resident() == {}


def test_lora_ids_are_stable_and_distinct(catalog):
    """The same id in every process (replicas of one pool must agree; Python's str hash would
    differ per process) and for every catalog order; distinct and positive (vLLM's rule)."""
    import subprocess
    import sys

    names = [e.name for e in catalog.experts if e.kind == "lora"]
    ids = [lora_id(n) for n in names]
    assert len(set(ids)) == len(names) and all(i > 0 for i in ids)
    code = "import sys; from experts.backends.vllm import lora_id; print(*[lora_id(n) for n in sys.argv[1:]])"
    for seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", code, *reversed(names)], capture_output=True, text=True, timeout=120,
                               env={**__import__("os").environ, "PYTHONHASHSEED": seed}, check=True)
        assert [int(i) for i in other.stdout.split()] == list(reversed(ids))
