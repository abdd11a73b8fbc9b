"""setup.py refuses a C++ compiler that would link libstdc++ statically into fastattr._C.

On a CUDA image whose CXX was an /opt/gcc with libstdc++.a and no libstdc++.so, the extension built, its kernels ran,
and every argument check whose message formats a number crashed Python with a segmentation fault (two libstdc++
copies, one beside torch's). These tests stand in such a compiler with a script answering -print-file-name.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a gcc toolchain check")


def fake_compiler(tmp_path, shared):
    """A gcc-style driver that knows libstdc++.a, and libstdc++.so only when `shared`."""
    so = "/opt/fake/lib/libstdc++.so" if shared else "libstdc++.so"  # gcc echoes a bare name it cannot find
    script = tmp_path / "fake-g++"
    script.write_text("#!/bin/sh\n"
                      'case "$1" in\n'
                      "  -print-file-name=libstdc++.a) echo /opt/fake/lib/libstdc++.a ;;\n"
                      f"  -print-file-name=libstdc++.so) echo {so} ;;\n"
                      "  *) exit 1 ;;\n"
                      "esac\n")
    script.chmod(0o755)
    return script


def setup_py_name(cxx):
    env = {**os.environ, "CXX": str(cxx), "FASTATTR_FORCE_CPU": "1"}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_static_only_libstdcxx_is_refused(tmp_path):
    out = setup_py_name(fake_compiler(tmp_path, shared=False))
    assert out.returncode != 0
    assert "/opt/fake/lib/libstdc++.a but no libstdc++.so" in out.stderr, out.stderr[-2000:]
    assert "CXX=/usr/bin/g++" in out.stderr


def test_shared_libstdcxx_passes(tmp_path):
    out = setup_py_name(fake_compiler(tmp_path, shared=True))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "fastattr"
