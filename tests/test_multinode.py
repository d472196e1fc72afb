"""A real two-node Ray cluster on this machine, started with `ray start`: the head (custom resource
`coe_head`) runs the ingress (which routes), the worker (`coe_worker`) the expert pool. The worker
is killed under load: every request is answered or gets a clean 503, none hangs; when a worker
joins again the app answers again. Slow: two raylets, a Serve app and a model."""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent
CLIENTS = 6
ASK = {"model": "coe", "messages": [{"role": "user", "content": "What is 17 * 23?"}], "max_tokens": 4}


def ray_start(*args: str, env: dict) -> None:
    subprocess.run([str(BIN / "ray"), "start", "--disable-usage-stats", *args], env=env, check=True,
                   capture_output=True, timeout=120)


def cluster_processes(ray_dir: str) -> list[psutil.Process]:
    """The processes of this test's cluster: their command lines name its session folder (Ray
    names its GCS by the machine's address, not the one it was given)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if ray_dir in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def with_children(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = list(processes)
    for p in processes:
        try:
            found += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def ask(url: str) -> int:
    try:
        return httpx.post(f"{url}/v1/chat/completions", json=ASK, timeout=180).status_code
    except httpx.HTTPError:
        return -1  # no answer at all: a hang or a dropped connection


def until_answered(url: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ask(url) == 200:
            return
        time.sleep(2)
    raise AssertionError(f"the app did not answer within {within_s:g} s")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pools_on_a_worker_node_that_dies_and_comes_back(tmp_path):
    port, http_port = free_port(), free_port()
    gcs = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    config = tmp_path / "coe.yaml"
    config.write_text(json.dumps({
        "backend": {"name": "hf"},  # a quick start; the placement is the point here
        # One machine: the worker node's proxy would share the head's port, so the head's alone serves.
        "serve": {"proxy_location": "HeadOnly", "ingress": {"ray_actor_options": {"num_cpus": 0, "resources": {"coe_head": 0.01}}},
                  "pools": {"default": {"ray_actor_options": {"num_cpus": 0.5, "resources": {"coe_worker": 0.01}},
                                        "max_ongoing_requests": 16, "max_queued_requests": 64}}},
        "resilience": {"timeout_seconds": 60, "retries": 1}}))
    # Ray's session folder holds its unix sockets, whose paths must stay under 108 bytes: not under tmp_path.
    ray_dir = tempfile.mkdtemp(prefix="coe-mn-")
    ray_start("--head", f"--port={port}", "--num-cpus=1", '--resources={"coe_head": 1}', f"--temp-dir={ray_dir}",
              "--include-dashboard=false", env=env)
    worker = ["--address", gcs, "--num-cpus=1", '--resources={"coe_worker": 1}']
    serving = None
    try:
        head = {p.pid for p in cluster_processes(ray_dir)}
        ray_start(*worker, env=env)
        worker_node = [p for p in cluster_processes(ray_dir) if p.pid not in head]  # its raylet and agents
        serving = subprocess.Popen([str(BIN / "coe"), "serve", "--config", str(config), "--port", str(http_port)],
                                   env={**env, "RAY_ADDRESS": gcs}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{http_port}"
        until_answered(url, within_s=300)
        placement = subprocess.run(
            [sys.executable, "-c",
             # The GCS's actor table (ray.util.state would need the dashboard, which is off here).
             "import json, ray; ray.init(); from ray._private.state import actors\n"
             "nodes = {n['NodeID']: sorted(n['Resources']) for n in ray.nodes()}\n"
             "print(json.dumps([(a['ActorClassName'], nodes[a['Address']['NodeID']])"
             " for a in actors(actor_state_name='ALIVE').values() if a['ActorClassName'].startswith('ServeReplica')]))"],
            env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=120, check=True)
        replicas = json.loads(placement.stdout.strip().splitlines()[-1])
        on_worker = {name for name, resources in replicas if "coe_worker" in resources}
        on_head = {name for name, resources in replicas if "coe_head" in resources}
        assert any("ExpertPool" in n for n in on_worker) and not any("ExpertPool" in n for n in on_head)
        assert any("CoeIngress" in n for n in on_head)

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as clients:
            load = [clients.submit(ask, url) for _ in range(3 * CLIENTS)]
            time.sleep(1.0)
            kill(with_children(worker_node))  # the worker node dies under load (its replicas are its raylet's children)
            statuses = [f.result(timeout=300) for f in load]
        assert set(statuses) <= {200, 503}, statuses  # answered, or a clean 503: never a hang or a 500
        assert ask(url) == 503  # no pool node: a clean refusal while it is gone
        ray_start(*worker, env=env)  # a worker node joins again
        until_answered(url, within_s=300)
    finally:
        if serving is not None:
            serving.send_signal(signal.SIGTERM)
            try:
                serving.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serving.kill()
        kill(with_children(cluster_processes(ray_dir)))
        shutil.rmtree(ray_dir, ignore_errors=True)
