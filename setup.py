"""Builds the native kernels (native/*.c) as the extension module hvd_signsgd._native.

Plain C against the CPython API: no build-time dependency on PyTorch. SIMD paths are compiled
with per-function target attributes and chosen at run time, so one build runs on any x86-64
or arm64 CPU. HVD_SIGNSGD_SANITIZE=1 builds with AddressSanitizer + UBSan (see Makefile).
"""
import os
import sys
from glob import glob

from setuptools import Extension, setup

cflags = ["-O3", "-std=c11", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"]
ldflags = []
if os.environ.get("HVD_SIGNSGD_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-wrapv",
           "-fno-omit-frame-pointer", "-O1", "-g"]
    cflags += san
    ldflags += san
if sys.platform == "darwin":
    cflags.append("-Wno-unknown-attributes")

setup(
    ext_modules=[
        Extension(
            "hvd_signsgd._native",
            sources=sorted(glob("native/*.c")),
            include_dirs=["native"],
            depends=sorted(glob("native/*.h")),   # a header edit rebuilds the module
            extra_compile_args=cflags,
            extra_link_args=ldflags,
        )
    ]
)
