"""What of this machine makes a compiled engine valid here and nowhere else.

ONNX Runtime picks its CPU kernels by instruction-set features, so a graph
optimized on an AVX-512 host may not even load on an AVX2 one; TensorRT
engines are tied to the GPU, CUDA, driver and TensorRT versions.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

# Flags that change the code ONNX Runtime (MLAS) generates or selects.
_X86_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
_ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve", "sve2")


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            flags.update(value.split())
    return flags


@lru_cache(maxsize=1)
def cpu_identity() -> dict[str, Any]:
    arch = platform.machine()
    flags = _cpu_flags()
    wanted = _ARM_FLAGS if arch in {"aarch64", "arm64"} else _X86_FLAGS
    return {"arch": arch, "isa": sorted(f for f in wanted if f in flags)}


def isa_tag(cpu: dict[str, Any]) -> str:
    """A short, readable summary for engine file names, e.g. ``x86_64-avx2``."""
    isa = set(cpu["isa"])
    level = next(
        (
            tag
            for tag, flag in (
                ("avx512", "avx512f"),
                ("avx2", "avx2"),
                ("avx", "avx"),
                ("sve2", "sve2"),
                ("sve", "sve"),
                ("neon", "asimd"),
            )
            if flag in isa
        ),
        "base",
    )
    return f"{cpu['arch']}-{level}"


def jetson_release() -> str | None:
    """The L4T release string on a Jetson (engines must be built on the vehicle), else None."""
    path = Path("/etc/nv_tegra_release")
    if not path.is_file():
        return None
    return path.read_text(errors="replace").splitlines()[0].strip()
