"""Import triton safely inside napari on Linux, before torch imports it and crashes the process.

Mesa's OpenGL drivers (llvmpipe, radeonsi) load ``libLLVM`` when napari creates its canvas. triton, which
PyTorch's Linux wheels install and torchvision imports (through ``torch._dynamo``), exports its own copy of
LLVM's symbols; loaded after Mesa's, they bind to Mesa's incompatible copy and the process segfaults.
Loaded with ``RTLD_DEEPBIND``, triton uses its own. Nothing happens when triton is already imported or not
installed, or when no ``libLLVM`` is loaded (no OpenGL yet, or another driver): then the usual order is safe.
Import this module before anything that imports torch.
"""

from __future__ import annotations

import os
import sys


def _llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return "libLLVM" in maps.read()
    except OSError:  # not Linux
        return False


def preload_triton() -> None:
    if "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND") or not _llvm_loaded():
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # not installed or broken: torch then runs without it, as it would anyway
        pass
    finally:
        sys.setdlopenflags(flags)


preload_triton()
