"""Where a server's CPU goes during a measured load: CPU milliseconds per request by the role of
each process of the server's process tree (the vLLM engine, Serve's proxy, the ingress, which
routes, the pool replicas, the controller, the rest of Ray), and the load generator's own, from
psutil before and after. On a machine whose cores the engine fills, every millisecond the front
end spends is one the engine does not get: this is what a throughput ratio to a bare engine server
is made of."""

from __future__ import annotations

import os

import psutil

# (role, a piece of the process's title or command line); the first that matches names the role
ROLES = (
    ("engine", "VLLM::"),
    ("api server", "vllm.entrypoints.openai.api_server"),
    ("serve proxy", "ray::ProxyActor"),
    ("ingress", "CoeIngress"),
    ("pool replica", "ExpertPool"),
    ("serve controller", "ServeController"),
)
GENERATOR = "load generator"
OTHER = "ray and the rest"  # gcs, raylet, agents, coe's own actors, the `coe serve` driver, reapers


def role(process: psutil.Process) -> str:
    if process.pid == os.getpid():
        return GENERATOR
    title = " ".join(process.cmdline()) or process.name()
    return next((name for name, piece in ROLES if piece in title), OTHER)


def snapshot(server_pid: int) -> dict[tuple[int, float], tuple[str, float]]:
    """(pid, start time) -> (role, CPU seconds so far) for the server's processes and this one."""
    processes = [psutil.Process()]
    try:
        root = psutil.Process(server_pid)
        processes += [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    seen = {}
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                seen[(process.pid, process.create_time())] = (role(process), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return seen


def per_request(before: dict, after: dict, requests: int, wall_s: float) -> dict:
    """CPU ms per request by role between two snapshots (a process started in between counts
    whole; one gone in between is lost, and rare), and how many cores the whole took."""
    by_role: dict[str, float] = {}
    for key, (name, seconds) in after.items():
        by_role[name] = by_role.get(name, 0.0) + seconds - before.get(key, (name, 0.0))[1]
    total = sum(by_role.values())
    return {"cpu_ms_per_request": {name: round(1000 * seconds / requests, 1) for name, seconds
                                   in sorted(by_role.items(), key=lambda item: -item[1])},
            "front_end_cpu_ms_per_request": round(1000 * (total - by_role.get("engine", 0.0) - by_role.get(GENERATOR, 0.0))
                                                  / requests, 1),
            "cores_busy": round(total / wall_s, 2)}
