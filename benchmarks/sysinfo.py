"""The machine and software a benchmark ran on (goes into every result)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("edgeml", "numpy", "onnx", "onnxruntime", "openvino", "apache-tvm", "torch", "nncf", "matplotlib")


def cpu_info(cpuinfo_text: str | None = None) -> dict[str, Any]:
    """CPU model, flags and core counts (from /proc/cpuinfo where there is one)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    model, flags = None, set()
    physical: set[tuple[str, str]] = set()
    phys_id = None
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware", "cpu model") and not model:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            phys_id = value
        elif key == "core id":
            physical.add((phys_id or "0", value))
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "model": model or platform.processor() or "unknown",
        "arch": platform.machine(),
        "logical_cores": os.cpu_count() or 1,
        "physical_cores": len(physical) or None,
        "usable_cores": usable,
        "flags": sorted(flags),
        "simd": sorted(f for f in flags if f.startswith(("avx", "sse4", "amx", "neon", "asimd", "sve", "fma"))),
    }


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def memory_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def system_info() -> dict[str, Any]:
    """Everything about the host that can change a number."""
    return {
        "cpu": cpu_info(),
        "memory_total_mb": memory_total_mb(),
        "os": {"system": platform.system(), "release": platform.release(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "hostname": platform.node(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (VmHWM on Linux), MiB."""
    from edgeml.runtime.model import peak_resident_memory_mb

    return peak_resident_memory_mb()
