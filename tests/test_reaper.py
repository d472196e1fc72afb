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
from tests.conftest import alive, still_running

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
CHILD = (f"import subprocess, sys, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]); time.sleep(600)")
OWNER = (f"import subprocess, sys, time\nfrom experts import reaper\nreaper.watch()\nreaper.watch()\n"
         f"subprocess.Popen([sys.executable, '-c', {CHILD!r}], start_new_session=True)\ntime.sleep(600)\n")


def test_a_sigkilled_owner_takes_every_descendant_with_it_even_those_that_ignore_sigterm():
    owner = subprocess.Popen([sys.executable, "-c", OWNER])
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(descendants) < 3:
            assert time.monotonic() < deadline, "the owner did not start its reaper, child and grandchild in 60 s"
            time.sleep(0.1)
            descendants = [p for p in psutil.Process(owner.pid).children(recursive=True) if alive(p)]
        reapers = [p for p in descendants if "experts.reaper" in " ".join(p.cmdline())]
        assert len(reapers) == 1, "watch() twice for one owner starts one reaper"
        others = [p for p in descendants if p not in reapers]
        assert all(os.getsid(p.pid) != os.getsid(owner.pid) for p in others + reapers)  # out of the owner's session
        # The reaper notes the owner's descendants every POLL_SECONDS: let it see the grandchild.
        time.sleep(10 * POLL_SECONDS)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        assert still_running(descendants, within_s=30) == [], "descendants outlived their owner"
    finally:
        owner.kill()
        owner.wait()
        for p in descendants:
            if alive(p):
                p.kill()
