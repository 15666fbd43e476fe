"""Rollout specs from the CLI: waves, rates, durations, and the stable split of devices into waves."""

from __future__ import annotations

import hashlib
import math

from edgeml.errors import UsageError


def parse_waves(text: str) -> list[float]:
    try:
        waves = [float(p.strip().rstrip("%")) / 100.0 for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--waves {text!r} must be percentages like 5%,25%,100%") from None
    if not waves or any(not 0 < w <= 1 for w in waves) or waves != sorted(waves) or waves[-1] != 1.0:
        raise UsageError(f"--waves {text!r} must be increasing percentages in (0, 100] ending at 100%",
                         hint="e.g. --waves 5%,25%,100%")
    return waves


def parse_rate(text: str | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip()
    try:
        return float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise UsageError(f"{text!r} is not a rate like 10% or 0.1") from None


def parse_duration(text: str | float) -> float:
    """``60s``, ``5m``, ``1h``, ``250ms`` or seconds -> seconds; finite and >= 0, else UsageError."""
    value = _duration(text)
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"duration {text!r} must be a finite, non-negative time like 60s, 5m or 1h")
    return value


def bounded_duration(text: str | float, option: str, *, min_s: float, max_s: float) -> float:
    """parse_duration, and within [min_s, max_s] (e.g. a heartbeat that would flood the broker)."""
    value = parse_duration(text)
    if not min_s <= value <= max_s:
        raise UsageError(f"{option} {text!r} is outside {min_s:g}s..{max_s:g}s",
                         hint=f"use a duration between {min_s:g}s and {max_s:g}s")
    return value


def _duration(text: str | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if s.endswith(unit):
            try:
                return float(s[: -len(unit)]) * units[unit]
            except ValueError:
                break
    try:
        return float(s)
    except ValueError:
        raise UsageError(f"duration {text!r} must look like 60s, 5m or 1h") from None


def assign_waves(rollout_id: str, device_ids: list[str], waves: list[float]) -> list[list[str]]:
    """Stable pseudo-random order (hash of rollout id + device id), cut at the cumulative percentages."""
    order = sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).hexdigest())
    n, out, start = len(order), [], 0
    for i, frac in enumerate(waves):
        end = n if i == len(waves) - 1 else max(start + (1 if start < n else 0), math.ceil(frac * n))
        out.append(order[start:end])
        start = end
    return out
