"""The machine a run's numbers come from, and whether two machines compute alike.

Bitwise reproducibility holds on one machine only: the same code and data on another CPU
can take other kernels (oneDNN and MKL pick them by instruction set: AMX, AVX-512-BF16,
AVX-512, AVX2), another thread count splits reductions differently, and a GPU rounds
differently again. Training amplifies such last-bit differences into other weights, so the
records of two machines differ by the run-to-run noise of training, not by a bug.

:func:`machine` is recorded in every record's ``provenance`` (``provenance.machine``);
:func:`numerics_differences` says which of its fields differ between two records (none:
the same kernels, so the same bits are expected).

Core module: torch and the standard library.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: CPU flags (Linux ``/proc/cpuinfo`` names) that select other kernels in oneDNN, MKL or
#: ATen, most specific first.
KERNEL_FLAGS = (
    "amx_bf16",
    "amx_fp16",
    "amx_int8",
    "amx_tile",
    "avx512_fp16",
    "avx512_bf16",
    "avx512_vnni",
    "avx512bw",
    "avx512vl",
    "avx512f",
    "avx_vnni",
    "avx2",
    "fma",
    "f16c",
    "asimd",
    "sve",
)
#: Environment variables that change which kernels run (recorded when set).
KERNEL_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "CUBLAS_WORKSPACE_CONFIG",
)
#: The fields of :func:`machine` that decide the numerics (the rest is informative).
NUMERICS = (
    "cpu",
    "isa",
    "aten_cpu_capability",
    "threads",
    "torch",
    "onednn",
    "mkl",
    "device",
    "cuda",
    "cudnn",
    "env",
)


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features") and key not in found:
            found[key] = value.strip()
    return found


@functools.cache
def _static() -> dict[str, Any]:
    import torch

    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    config = torch.__config__.show()
    onednn = re.search(r"(?:MKL-DNN|oneDNN)[^\n]*?v(\d+(?:\.\d+)+)", config)
    mkl = re.search(r"Math Kernel Library Version (\S+)", config)
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "isa": [flag for flag in KERNEL_FLAGS if flag in flags],
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "onednn": onednn.group(1) if onednn else None,
        "mkl": mkl.group(1) if mkl else None,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def machine() -> dict[str, Any]:
    """This machine as a record's ``provenance.machine``.

    Returns:
        ``cpu`` (model name), ``isa`` (the :data:`KERNEL_FLAGS` it has), ``aten_cpu_capability``
        (the kernels ATen dispatches to: ``AVX512``, ``AVX2``, ...), ``threads`` (torch's
        intra-op threads), ``torch``, ``onednn``, ``mkl`` (library versions), ``device``
        (``"cpu"`` or the CUDA device's name), ``cuda``, ``cudnn`` (versions, ``None`` on a
        CPU), ``env`` (the :data:`KERNEL_ENV` variables that are set), ``python``, ``os``.
    """
    import torch

    gpu = torch.cuda.is_available()
    return {
        **_static(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "cuda": torch.version.cuda if gpu else None,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "env": {key: os.environ[key] for key in KERNEL_ENV if key in os.environ},
    }


def numerics_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The :data:`NUMERICS` fields in which two :func:`machine` records differ, as
    ``"field: A vs B"`` (empty: the same kernels, so bitwise-equal results are expected).
    A field missing from one record counts as different."""
    out = []
    for key in NUMERICS:
        if a.get(key, "?") != b.get(key, "?"):
            out.append(f"{key}: {_show(a.get(key))} vs {_show(b.get(key))}")
    return out


def describe(record: Mapping[str, Any] | None) -> str:
    """A short description of a :func:`machine` record (``"not recorded"`` for ``None``)."""
    if not record:
        return "not recorded"
    isa = ", ".join(record.get("isa") or []) or "no listed ISA flags"
    return (
        f"{record.get('cpu')} ({isa}; {record.get('threads')} threads), device "
        f"{record.get('device')}, torch {record.get('torch')}, oneDNN {record.get('onednn')}"
    )


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
