"""Engine processes that die with their owner.

vLLM runs its engine core and workers in processes of their own, which outlive a SIGKILLed owner
(a `coe serve` killed hard, a Serve replica ended by `ray stop --force`) and ignore SIGTERM: 3 GB
and a busy core each. `watch()` starts, once per owner process, a small reaper process in a
session of its own (so a Ctrl-C to the terminal's process group or a kill of the owner's group
does not reach it): while the owner lives it notes the owner's descendants every half second;
once the owner is gone, or a zombie, it SIGKILLs every descendant it saw (checked by creation
time, so a reused pid is never hit) and exits.

    python -m experts.reaper OWNER_PID
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil

POLL_SECONDS = 0.5
_started: set[int] = set()
_lock = threading.Lock()


def watch(owner: int | None = None) -> None:
    """Start the reaper for `owner` (default: this process) unless one runs for it already."""
    owner = owner or os.getpid()
    with _lock:
        if owner in _started:
            return
        subprocess.Popen([sys.executable, "-m", "experts.reaper", str(owner)], start_new_session=True, close_fds=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _started.add(owner)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(owner: int, poll_seconds: float = POLL_SECONDS) -> list[int]:
    """Wait for the owner to die, then kill the descendants it had; returns their pids."""
    me = os.getpid()
    seen: dict[int, float] = {}
    try:
        process = psutil.Process(owner)
    except psutil.NoSuchProcess:
        return []
    while _alive(process):
        try:
            for child in process.children(recursive=True):
                if child.pid != me:
                    seen[child.pid] = child.create_time()  # a reused pid: the newer process
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_seconds)
    killed = []
    for pid, created in seen.items():
        try:
            child = psutil.Process(pid)
            if child.create_time() == created:
                child.kill()
                killed.append(pid)
        except psutil.NoSuchProcess:
            continue
    return killed


if __name__ == "__main__":
    reap(int(sys.argv[1]))
