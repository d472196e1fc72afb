"""The reaper (experts/reaper.py) with real processes, in seconds: an owner starts it (twice: one
reaper per owner), then a child in a session of its own that ignores SIGTERM, as vLLM's engine
processes do, which starts a grandchild of its own. SIGKILLing the owner leaves none of them, and
the reaper exits too. `coe serve` stopped hard end to end (its vLLM engines, `ray stop --force`)
is tests/test_serve_stop.py's slow test."""

import os
import signal
import subprocess
import sys
import time

import psutil

from experts.reaper import POLL_SECONDS

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
CHILD = (f"import subprocess, sys, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]); time.sleep(600)")
OWNER = (f"import subprocess, sys, time\nfrom experts import reaper\nreaper.watch()\nreaper.watch()\n"
         f"subprocess.Popen([sys.executable, '-c', {CHILD!r}], start_new_session=True)\ntime.sleep(600)\n")


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s:.0f} s")


def test_a_sigkilled_owner_takes_every_descendant_with_it_even_those_that_ignore_sigterm():
    owner = subprocess.Popen([sys.executable, "-c", OWNER])
    descendants: list[psutil.Process] = []
    try:
        def three_descendants():
            found = [p for p in psutil.Process(owner.pid).children(recursive=True) if alive(p)]
            return found if len(found) == 3 else None

        descendants += wait_for(three_descendants, 60, "the owner did not start its reaper, child and grandchild")
        reapers = [p for p in descendants if "experts.reaper" in " ".join(p.cmdline())]
        assert len(reapers) == 1, "watch() twice for one owner starts one reaper"
        others = [p for p in descendants if p not in reapers]
        assert all(os.getsid(p.pid) != os.getsid(owner.pid) for p in others + reapers)  # out of the owner's session
        # The reaper notes the owner's descendants every POLL_SECONDS: let it see the grandchild.
        time.sleep(10 * POLL_SECONDS)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        wait_for(lambda: not any(alive(p) for p in descendants), 30, "descendants outlived their owner")
    finally:
        owner.kill()
        owner.wait()
        for p in descendants:
            if alive(p):
                p.kill()
