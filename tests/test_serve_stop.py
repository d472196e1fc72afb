"""`coe serve` stopped the ways people stop it leaves no process behind: a graceful SIGTERM ends
every process it started (Ray's included), and a hard stop (SIGTERM, SIGKILL two seconds later,
then every process of its Ray cluster SIGKILLed, as `ray stop --force` does) leaves no vLLM
engine running. Real `coe serve` processes on the default backend (vLLM where installed).

The hard stop is in the slow tier (a second `coe serve` start: two minutes of the default suite);
the default suite checks its mechanism, the reaper, with real processes in tests/test_reaper.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port, still_running

COE = str(Path(sys.executable).with_name("coe"))
START_TIMEOUT_S = 240


def serve() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([COE, "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "coe serve exited while starting"
        try:
            body = {"model": "coe", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200:
                return process, url  # answered: every deployment and its engine are up
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise AssertionError(f"coe serve did not answer within {START_TIMEOUT_S} s")


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def engines(processes: list[psutil.Process]) -> list[psutil.Process]:
    def is_engine(p: psutil.Process) -> bool:
        try:
            return "VLLM" in p.name() or "EngineCore" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if is_engine(p)]


@pytest.mark.timeout(600)
def test_sigterm_ends_every_process_coe_serve_started():
    process, _ = serve()
    started = descendants(process)
    assert started, "coe serve runs its Ray cluster and replicas as its descendants"
    process.send_signal(signal.SIGTERM)
    # 0: its own stop ran to the end (ray.init's SIGTERM handler, left in place, aborted it: -6)
    assert process.wait(timeout=120) == 0
    assert still_running(started, within_s=60) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hard_stop_leaves_no_engine_running():
    pytest.importorskip("vllm", reason="the vLLM engine is not installed (scripts/install.sh installs it)")
    process, _ = serve()
    started = descendants(process)
    running_engines = engines(started)
    assert running_engines, "the expert pool runs a vLLM engine in processes of its own"
    process.send_signal(signal.SIGTERM)
    time.sleep(2)
    process.kill()  # an impatient process manager
    process.wait(timeout=30)
    for p in ray_processes(started):  # `ray stop --force`, on this server's Ray cluster only
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert still_running(running_engines, within_s=30) == []


def ray_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes `ray stop --force` kills: Ray's own list of names and command lines."""
    import subprocess as sp

    from ray.autoscaler._private.constants import RAY_PROCESSES

    found = []
    for p in processes:
        try:
            name, command = p.name(), sp.list2cmdline(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if any(keyword in (name if by_name else command) for keyword, by_name in RAY_PROCESSES):
            found.append(p)
    return found
