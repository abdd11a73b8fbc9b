"""The CUDA kernels' own code (csrc/cuda/*.cuh) run on CPU threads by the host emulator in tests/cuda_emu, against a
float64 evaluation of the same formulas. No GPU needed, so every CI run checks the kernels' indexing, masking,
splits, reductions and barrier placement; speed, real fragment layouts and streams still need tests/test_cuda_ops.py
on a GPU. Needs g++ (C++20) and the CUDA headers (cuda_fp16.h) under $CUDA_HOME (default /usr/local/cuda).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = Path(os.getenv("CUDA_HOME", "/usr/local/cuda"))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None or not (CUDA_HOME / "include" / "cuda_fp16.h").exists():
        pytest.skip(f"needs g++ and the CUDA headers under {CUDA_HOME}/include")
    exe = tmp_path_factory.mktemp("cuda_emu") / "emu_kernels"
    cmd = ["g++", "-std=c++20", "-O1", "-w", f"-I{CUDA_HOME / 'include'}", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "cuda_emu" / "emu_kernels.cpp"), "-o", str(exe), "-pthread"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, "the kernel headers do not compile for the host emulator:\n" + build.stderr[-4000:]
    return exe


def run(exe, *args):
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0 and "FAIL" not in result.stdout, report[-6000:]
    assert "checks passed" in result.stdout, report[-2000:]
    return report


def test_kernels_on_the_host_emulator(emulator):
    """Every kernel and engine (SIMT fp32/fp64/fp16, wmma fp16/bf16/TF32) on small ragged shapes."""
    run(emulator, "quick")


@pytest.mark.slow
def test_kernels_on_the_host_emulator_all_shapes(emulator):
    run(emulator)
