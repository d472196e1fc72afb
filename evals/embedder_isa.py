"""The routing embedder's vectors on an AVX2-only x86 CPU, measured on this one: the same questions
embedded natively and under QEMU's user-mode emulation of a Haswell (AVX2, FMA, no AVX-512);
prints one JSON object.

    python -m evals.embedder_isa [--queries 48] [--out evals/results/embedder_isa.json]

Runtimes pick their kernels by the CPU's vector extensions, so a result computed from embeddings
(the router and replay tables) is only as reproducible across CPU kinds as the vectors are. Each
runtime (ONNX int8, the default, and ONNX float32) embeds the questions in a child process, once
natively and once as `qemu-x86_64 -cpu Haswell python ...`; per runtime: the largest difference of
a vector component, the cosine between the two CPUs' vectors (min, mean), the share of questions
whose nearest other question is the same on both (what a 1-NN router looks up) and, for int8,
each side's cosine to the native float32 vectors (if one side were wrong, as saturated AVX2 sums
would make it, it would sit farther from float32). Needs QEMU's user-mode emulator (Debian:
`apt-get install qemu-user`) and an x86-64 host; the emulated runs take minutes (the provenance has the wall time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from evals.bench_embedder import nearest
from evals.provenance import REPO, add_note_argument, module_program, write_summary

EMULATED_CPU = "Haswell"
RUNTIMES = ("onnx-int8", "onnx")
FLOAT = "onnx"


def qemu() -> str | None:
    """QEMU's x86-64 user-mode emulator, where this host can run it."""
    return shutil.which("qemu-x86_64") if os.uname().machine == "x86_64" else None


def embed_in_child(runtime: str, texts_file: Path, out: Path, emulated: bool) -> None:
    command = [sys.executable, "-m", "evals.embedder_isa", "--child", runtime, str(texts_file), str(out)]
    if emulated:
        command = [qemu(), "-cpu", EMULATED_CPU, *command]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")


def child(runtime: str, texts_file: Path, out: Path) -> None:
    from routers.embedder import Embedder

    texts = texts_file.read_text().split("\x00")
    np.save(out, Embedder(runtime=runtime).embed(texts))  # never the cache: it would hand back the host's vectors


def compare(native: np.ndarray, emulated: np.ndarray) -> dict:
    cosine = (native * emulated).sum(axis=1)
    return {"max_abs_difference": float(np.abs(native - emulated).max()),
            "cosine_min": round(float(cosine.min()), 6), "cosine_mean": round(float(cosine.mean()), 6),
            "same_nearest_question": round(float(np.mean(nearest(native) == nearest(emulated))), 4)}


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], Path(argv[2]), Path(argv[3]))
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=48, help="MMLU-Pro test questions, evenly spread")
    parser.add_argument("--dataset", default="mmlu_pro:test")
    parser.add_argument("--out", type=Path, default=None)
    add_note_argument(parser)
    args = parser.parse_args(argv)
    if qemu() is None:
        parser.error("needs QEMU's user-mode emulator on an x86-64 host (Debian: apt-get install qemu-user)")

    from evals.outcomes import load_outcomes, spread_rows
    from routers.embedder import Embedder

    data = load_outcomes(args.dataset)
    texts = [data.data.texts[i] for i in spread_rows(len(data.data.texts), args.queries)]
    for runtime in RUNTIMES:
        Embedder(runtime=runtime).embed(texts[:1])  # exports the ONNX files once, natively, before any child reads them
    vectors: dict[tuple[str, bool], np.ndarray] = {}
    with tempfile.TemporaryDirectory() as folder:
        texts_file = Path(folder) / "texts"
        texts_file.write_text("\x00".join(texts))
        for runtime in RUNTIMES:
            for emulated in (False, True):
                out = Path(folder) / f"{runtime}-{emulated}.npy"
                embed_in_child(runtime, texts_file, out, emulated)
                vectors[runtime, emulated] = np.load(out)
    runtimes = {runtime: compare(vectors[runtime, False], vectors[runtime, True]) for runtime in RUNTIMES}
    for runtime in RUNTIMES:
        if runtime != FLOAT:
            for side, emulated in (("native", False), ("emulated", True)):
                cosine = (vectors[runtime, emulated] * vectors[FLOAT, False]).sum(axis=1)
                runtimes[runtime][f"{side}_cosine_to_float_mean"] = round(float(cosine.mean()), 5)
    version = subprocess.run([qemu(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    summary = {"dataset": args.dataset, "queries": len(texts), "emulated_cpu": EMULATED_CPU, "emulator": version,
               "default": Embedder().runtime, "runtimes": runtimes}
    return write_summary(summary, args.out, args=args, argv=argv, program=module_program(__spec__))


if __name__ == "__main__":
    main()
