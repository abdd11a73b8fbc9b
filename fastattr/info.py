"""`fastattr info`: versions, which kernels are built, and a numeric self-test of every op against its reference."""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from . import __version__, ops, testing


def git_commit() -> str:
    """The checkout's commit, with '-dirty' when tracked files have uncommitted changes ('unknown' outside git)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(packages=("numpy", "gymnasium", "stable-baselines3")) -> dict:
    """What a recorded result needs beside its numbers: commit (dirty or not), date, machine, versions."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "torch": torch.__version__, **versions}


def self_test(device: str) -> list[tuple[str, str, bool, str]]:
    """Runs every built kernel on testing.sample_inputs against the float64 reference: (op, dtype, ok, detail)."""
    rows = []
    for op in ops.OPS:
        if not ops.has_kernel(op, device):
            rows.append((op, "-", False, "not built"))
            continue
        kernel = getattr(torch.ops.fastattr, op).default
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            worst = 0.0
            ok = True
            for args in testing.sample_inputs(op, device, dtype):
                ours, torch_err, scale = testing.error_vs_reference(op, args, kernel)
                ok &= testing.within_tolerance(ours, torch_err, scale, dtype)
                worst = max(worst, ours / max(scale, 1e-30))
            rows.append((op, str(dtype).replace("torch.", ""), ok, f"max rel err {worst:.1e}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattr info", description=__doc__)
    p.add_argument("--no-self-test", action="store_true", help="only print versions and built kernels")
    args = p.parse_args(argv)
    print(f"fastattr {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"(torch CUDA {torch.version.cuda or 'none'}, GPU visible: {torch.cuda.is_available()})")
    print(f"extension fastattr._C: {'loaded' if ops.HAS_C else 'NOT BUILT (' + str(ops._IMPORT_ERROR) + ')'}; "
          f"built against CUDA {ops.cuda_version() if ops.cuda_version() != -1 else 'none (CPU-only build)'}; "
          f"OpenMP threads {torch.get_num_threads()}")
    print("kernels built:")
    for op in ops.OPS:
        print(f"  {op:<16} cpu: {'yes' if ops.has_kernel(op, 'cpu') else 'no':<4} "
              f"cuda: {'yes' if ops.has_kernel(op, 'cuda') else 'no'}")
    if args.no_self_test:
        return 0
    failed = False
    for device in testing.devices():
        print(f"self-test on {device} (kernel error <= 2x torch's own error vs a float64 reference):")
        for op, dtype, ok, detail in self_test(device):
            built = detail != "not built"
            failed |= built and not ok or (device == "cpu" and not built)
            print(f"  {op:<16} {dtype:<9} {'PASS' if ok else ('FAIL' if built else 'SKIP')}  {detail}")
    print("self-test: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
