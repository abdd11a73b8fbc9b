"""Builds fastattr._C: the TORCH_LIBRARY ops with their CPU (OpenMP) kernels, plus CUDA kernels when asked.

Knobs (environment variables):
  FASTATTR_FORCE_CUDA=1  build the CUDA kernels even without a visible GPU (needs a CUDA build of torch + nvcc)
  FASTATTR_FORCE_CPU=1   never build the CUDA kernels
  FASTATTR_DEBUG=1       -O0 -g for both compilers
  TORCH_CUDA_ARCH_LIST   always wins; the default below is only set when no GPU is visible
  CC, CXX                the host compilers (setuptools and torch read them); the linker must find a shared libstdc++
"""
import os
import shlex
import subprocess
import sys
import sysconfig
from glob import glob

import torch
from setuptools import setup
from torch.__config__ import parallel_info
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

FORCE_CUDA, FORCE_CPU, DEBUG = (os.getenv(f"FASTATTR_{k}") == "1" for k in ("FORCE_CUDA", "FORCE_CPU", "DEBUG"))
# Ampere, Hopper, Blackwell, plus PTX so newer parts JIT-compile. CUDA 13 has no sm_70.
DEFAULT_ARCH_LIST = "8.0;8.6;9.0;10.0;12.0+PTX"


def check_shared_libstdcxx():
    """Refuses a C++ compiler that would link libstdc++ statically into fastattr._C.

    Such a toolchain (seen in a CUDA image whose CC/CXX point to an /opt/gcc that ships libstdc++.a but no
    libstdc++.so) puts a second copy of libstdc++ beside the one torch uses. The two disagree on locale facets, so every
    error message that formats a number (our argument checks name sizes) crashes the process with a segmentation fault
    instead of raising. The build would succeed and the kernels would run: only the errors break.
    """
    cxx = shlex.split(os.getenv("CXX") or sysconfig.get_config_var("CXX") or "c++")

    def library_path(name):  # the compiler's own answer; a bare name back means it has no such file
        try:
            out = subprocess.run([*cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None  # not a gcc-style driver: nothing to check here, the build itself will say more
        path = out.stdout.strip()
        return path if out.returncode == 0 and os.path.isabs(path) else None

    static = library_path("libstdc++.a")
    if static and not library_path("libstdc++.so"):
        raise RuntimeError(
            f"fastattr: the C++ compiler {' '.join(cxx)!r} (from CXX or Python's sysconfig) has {static} but no "
            "libstdc++.so, so it would link libstdc++ statically into fastattr._C, beside torch's own copy: every "
            "error message with a number in it would then crash Python with a segmentation fault. Build with a "
            "compiler that links libstdc++ dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++ pip install ..."
        )


def get_extensions():
    check_shared_libstdcxx()
    with_cuda = not FORCE_CPU and (FORCE_CUDA or torch.cuda.is_available())
    if with_cuda and (torch.version.cuda is None or CUDA_HOME is None):
        raise RuntimeError(
            "fastattr: a CUDA build was requested (FASTATTR_FORCE_CUDA=1 or a visible GPU) but "
            f"torch {torch.__version__} is a CPU-only build or CUDA_HOME is unset. Install a CUDA build of torch "
            "and set CUDA_HOME=/usr/local/cuda, or build CPU-only with FASTATTR_FORCE_CPU=1."
        )
    if with_cuda and not torch.cuda.is_available() and not os.getenv("TORCH_CUDA_ARCH_LIST"):
        # torch crashes on an unset arch list without a visible GPU; the user's value always wins.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        print(f"fastattr: no GPU visible, building for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")

    info = parallel_info()
    openmp = "backend: OpenMP" in info and "OpenMP not found" not in info and sys.platform != "darwin"
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + (["-fopenmp"] if openmp else [])
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"]

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob(os.path.join(root, "csrc", "*.cpp")) + glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    sources = [os.path.relpath(s, root) for s in sources]
    extension, define_macros = CppExtension, []
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(os.path.relpath(s, root) for s in glob(os.path.join(root, "csrc", "cuda", "*.cu")))
        extension, define_macros = CUDAExtension, [("WITH_CUDA", None)]
        extra["nvcc"] = nvcc
    return [
        extension(
            "fastattr._C",
            sources,
            include_dirs=[os.path.join(root, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] if openmp else [],
        )
    ]


setup(ext_modules=get_extensions(), cmdclass={"build_ext": BuildExtension})
