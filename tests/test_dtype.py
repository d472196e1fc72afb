"""The serving dtype `auto` picks: bfloat16 only where the hardware computes it natively."""

import platform

import pytest
import torch

from experts.backends.dtype import resolve_dtype


@pytest.mark.parametrize(("machine", "avx512_bf16", "amx", "expected"), [
    ("x86_64", False, False, "float32"),  # AVX2 only: bf16 is emulated, 3-5x slower than float32
    ("x86_64", True, False, "bfloat16"),
    ("x86_64", False, True, "bfloat16"),
    ("aarch64", False, False, "bfloat16"),
])
def test_auto_takes_bfloat16_only_where_the_cpu_runs_it(monkeypatch, machine, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("auto") == resolve_dtype() == expected


def test_auto_takes_bfloat16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_dtype() == "bfloat16"


def test_an_explicit_dtype_stays_and_a_wrong_one_is_refused():
    assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("float16") == "float16"
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_dtype("fp8")


def test_the_hf_backend_runs_in_the_resolved_dtype(catalog):
    from experts.backends.hf import HFBackend

    assert HFBackend(catalog).dtype == getattr(torch, resolve_dtype())
