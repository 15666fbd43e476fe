"""Rollout specs from the CLI: waves, rates, durations, and the stable split of devices into waves."""

from __future__ import annotations

import hashlib
import math

from edgeml.errors import UsageError


Wave = float | str   # a cumulative fraction of the selected devices, or "key=value": every device with that label


def parse_waves(text: str) -> list[Wave]:
    """``5%,25%,100%`` or, with label waves first, ``ring=canary,50%,100%``: a label wave takes every selected
    device carrying that label (not in an earlier wave); a percentage is cumulative over all selected devices
    (label waves count towards it). Percentages increase and the last wave is 100%."""
    waves: list[Wave] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part:
            key, _, value = part.partition("=")
            if not key.strip() or not value.strip() or len(part) > 200:
                raise UsageError(f"--waves {text!r}: label wave {part!r} must be KEY=VALUE, e.g. ring=canary")
            waves.append(f"{key.strip()}={value.strip()}")
            continue
        try:
            waves.append(float(part.rstrip("%")) / 100.0)
        except ValueError:
            raise UsageError(f"--waves {text!r} must be percentages like 5%,25%,100% or labels like ring=canary",
                             hint="e.g. --waves ring=canary,50%,100%") from None
    fractions = [w for w in waves if isinstance(w, float)]
    if (not waves or len(waves) > 100 or any(not 0 < w <= 1 for w in fractions) or fractions != sorted(fractions)
            or waves[-1] != 1.0):
        raise UsageError(f"--waves {text!r} must be increasing percentages in (0, 100] ending at 100%"
                         " (label waves like ring=canary may come before or between them)",
                         hint="e.g. --waves 5%,25%,100% or --waves ring=canary,50%,100%")
    return waves


def wave_label(w: Wave) -> str:
    """How a wave is shown: ``25%`` or ``ring=canary``."""
    return w if isinstance(w, str) else f"{w * 100:g}%"


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


def assign_waves(rollout_id: str, device_ids: list[str], waves: list[Wave],
                 labels: dict[str, dict[str, str]] | None = None) -> list[list[str]]:
    """Stable pseudo-random order (hash of rollout id + device id); label waves take their devices, fractions cut
    the order at the cumulative percentage (counting every device placed so far); the last wave takes the rest."""
    order = sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}:{d}".encode()).hexdigest())
    n, out, placed = len(order), [], set[str]()
    for i, w in enumerate(waves):
        free = [d for d in order if d not in placed]
        if i == len(waves) - 1:
            take = free
        elif isinstance(w, str):
            key, _, value = w.partition("=")
            take = [d for d in free if (labels or {}).get(d, {}).get(key) == value]
        else:
            want = max(len(placed) + (1 if free else 0), math.ceil(w * n)) - len(placed)
            take = free[:max(0, want)]
        out.append(take)
        placed.update(take)
    return out
