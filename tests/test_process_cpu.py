"""evals/process_cpu.py: a server tree's CPU per request, by the role of each process."""

import subprocess
import sys
import time

from evals import process_cpu

# A "server" whose child burns CPU with the engine's title in its command line (built, so the
# server's own command line does not carry it), and whose own process sleeps: the child's seconds
# are the engine's, the parent's almost nothing.
SERVER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "while True: pass", "VLLM" + "::EngineCore"])
child.wait()
"""


def test_cpu_per_request_goes_to_the_role_of_the_process_that_spent_it():
    server = subprocess.Popen([sys.executable, "-c", SERVER])
    try:
        deadline = time.monotonic() + 60
        while len(process_cpu.snapshot(server.pid)) < 3 and time.monotonic() < deadline:  # this process, server, child
            time.sleep(0.05)
        before, started = process_cpu.snapshot(server.pid), time.monotonic()
        roles = {name for name, _ in before.values()}
        assert roles == {"engine", process_cpu.OTHER, process_cpu.GENERATOR}
        while time.monotonic() < deadline:
            after = process_cpu.snapshot(server.pid)
            figures = process_cpu.per_request(before, after, requests=10, wall_s=time.monotonic() - started)
            if figures["cpu_ms_per_request"]["engine"] >= 30:  # 0.3 s of the child's CPU over 10 requests
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the busy child's CPU never showed: {figures}")
    finally:
        subprocess.run(["pkill", "-P", str(server.pid)])
        server.kill()
        server.wait()
    by_role = figures["cpu_ms_per_request"]
    assert by_role["engine"] > by_role[process_cpu.OTHER]
    # the front end is everything but the engine and the load generator
    assert figures["front_end_cpu_ms_per_request"] == by_role[process_cpu.OTHER]
    assert 0 < figures["cores_busy"] <= 2.5
