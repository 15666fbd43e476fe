"""Assemble the artifact manifest: provenance, self-test data, tolerances.

Reproducibility: ``provenance.created`` comes from ``SOURCE_DATE_EPOCH`` when
it is set. Timings are measurements and differ run to run, so with
``SOURCE_DATE_EPOCH`` set every timing field (candidate ``latency_ms`` and
``build_seconds``, ``selftest.latency_budget_ms``) is written as ``null``; the
timings still drive selection. Same model + data + options + tools with a
pinned ``--backend`` and ``--precision`` (one candidate) then give a
byte-identical ``.edgepkg``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from importlib import metadata
from typing import Any

import numpy as np

from edgeml.errors import UsageError

# neural-compressor is not used (docs/compiler.md says why), so it is not recorded either.
TOOL_PACKAGES = ("edgeml", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "apache-tvm", "torch", "onnxscript")

# Self-test tolerances by precision: the device may use other kernels (ISA) than the compile host.
# bf16 keeps 8 mantissa bits: another CPU (AMX vs AVX512-BF16 kernels) may round each layer differently
SELFTEST_TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (1e-2, 1e-2), "bf16": (3e-2, 3e-2)}
GOLDEN_SAMPLES = 4


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={value!r} is not an integer number of seconds") from None


def created_timestamp(epoch: int | None) -> str:
    when = _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc) if epoch is not None else _dt.datetime.now(_dt.timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def tool_versions() -> dict[str, str]:
    """Installed versions of the packages that shape artifacts (without importing them)."""
    out = {"python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def selftest_tolerance(precision: str, golden_outputs: dict[str, np.ndarray]) -> tuple[float, float]:
    if precision in SELFTEST_TOLERANCE:
        return SELFTEST_TOLERANCE[precision]
    # int8: another CPU may round differently by a quantization step; scale atol to the output range.
    peak = max((float(np.abs(v).max()) for v in golden_outputs.values() if v.size), default=1.0)
    return 0.05, float(f"{max(1e-3, 0.05 * peak):.4g}")


def latency_budget_ms(p90: float | None) -> float | None:
    """Generous: catches a broken or wildly wrong device, not ordinary variance."""
    if p90 is None:
        return None
    return round(max(50.0, 20.0 * p90), 1)


def host_info() -> dict[str, Any]:
    from edgeml.targets import host_arch, host_features

    feats = host_features()
    return {"arch": host_arch(), "vnni": bool({"avx512_vnni", "avx_vnni"} & feats),
            "avx512f": "avx512f" in feats, "avx2": "avx2" in feats, "python": sys.version.split()[0]}
