"""Build flash_ext against the torch already installed.

CUDAExtension (CPU + CUDA kernels) when torch has CUDA and nvcc is found, else CppExtension (CPU
kernels only). Environment:
  FLASH_EXT_CUDA_ARCHS  semicolon-separated archs, default "80;90a" (sm_80 family everywhere;
                        the sm_90a Hopper kernels only where 90a is listed)
  FLASH_EXT_FORCE_CPU=1 build the CPU-only extension even where CUDA is available
  MAX_JOBS              parallel compile jobs (ninja)
"""
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _rel(*parts):
    return os.path.join("csrc", *parts)


def _sources(folder, suffix):
    path = os.path.join(ROOT, "csrc", folder)
    if not os.path.isdir(path):
        return []
    return sorted(_rel(folder, f) for f in os.listdir(path) if f.endswith(suffix))


def _cuda_reason():
    if os.environ.get("FLASH_EXT_FORCE_CPU", "0") == "1":
        return "FLASH_EXT_FORCE_CPU=1"
    if torch.version.cuda is None:
        return "the installed torch has no CUDA"
    if CUDA_HOME is None:
        return "nvcc was not found (CUDA_HOME is unset)"
    return None


def _gencode_flags(archs):
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _extension():
    cxx_flags = ["-O3", "-std=c++17"]
    sources = [_rel("flash_ext.cpp"), _rel("kvcache.cpp")] + _sources("cpu", ".cpp")
    reason = _cuda_reason()
    if reason is not None:
        print(f"flash_ext: building the CPU-only extension ({reason}); CUDA tensors will be rejected.")
        return CppExtension("flash_ext._C", sources, extra_compile_args={"cxx": cxx_flags})

    archs = [a.strip() for a in os.environ.get("FLASH_EXT_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    print(f"flash_ext: building the CUDA extension for archs {archs} (CUDA {torch.version.cuda}).")
    kernels = _sources(os.path.join("kernels", "instantiations"), ".cu")
    if "90a" not in archs:  # the Hopper kernels need sm_90a (wgmma, setmaxnreg)
        kernels = [f for f in kernels if "_sm90_" not in os.path.basename(f)]
    sources += _sources("cuda", ".cu") + kernels
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + _gencode_flags(archs)
    if os.environ.get("FLASH_EXT_PTXAS_VERBOSE") == "1":  # ptxas' register / spill report (tools/gpu_check.sh)
        nvcc_flags.append("-Xptxas=-v")
    defines = [("FLASH_EXT_WITH_CUDA", "1")]
    if "90a" in archs:
        defines.append(("FLASH_EXT_WITH_SM90", "1"))
    return CUDAExtension(
        "flash_ext._C",
        sources,
        define_macros=defines,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


def _write_build_info(cuda_built, archs):
    """flash_ext/_build_info.py: what this build is compiled against, which `import flash_ext` compares with the torch
    it finds (flash_ext/__init__.py), so a mismatch is one clear error instead of an undefined symbol."""
    info = dict(VERSION=VERSION, TORCH_VERSION=torch.__version__, TORCH_CUDA=torch.version.cuda, CUDA_BUILT=cuda_built,
                CUDA_ARCHS=archs)
    lines = ['"""Written by setup.py at build time: what the compiled extension was built against."""']
    lines += [f"{k} = {v!r}" for k, v in info.items()]
    with open(os.path.join(ROOT, "flash_ext", "_build_info.py"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


_ext = _extension()
_cuda = _cuda_reason() is None
_write_build_info(_cuda, os.environ.get("FLASH_EXT_CUDA_ARCHS", "80;90a") if _cuda else "")

setup(
    name="flash_ext",
    version=VERSION,
    description="Hand-written CUDA FlashAttention for PyTorch, with a tiled CPU implementation",
    packages=find_packages(include=["flash_ext", "flash_ext.*"]),
    ext_modules=[_ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    zip_safe=False,
)
