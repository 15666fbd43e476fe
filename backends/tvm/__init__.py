"""Apache TVM: ONNX -> Relax -> a shared library per target (cross-compiled for aarch64), optional MetaSchedule tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeml.backends.entry import Backend
from edgeml.backends.options import option


def parse_budget(value: Any) -> float:
    """``600``, ``"600"``, ``"600s"``, ``"10m"``, ``"1h"``, ``"1h30m"`` -> seconds (0 = untuned)."""
    if value is None or value == "" or value is False:
        return 0.0
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        seconds, number = 0.0, ""
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            for ch in text:
                if ch.isdigit() or ch == ".":
                    number += ch
                elif ch in units and number:
                    seconds += float(number) * units[ch]
                    number = ""
                else:
                    raise ValueError(ch)
            if number:
                seconds += float(number)
        except ValueError:
            from edgeml.errors import UsageError

            raise UsageError(f"tune budget {value!r} is not a duration", hint="use e.g. 600, 90s, 10m or 1h") from None
    if seconds < 0:
        from edgeml.errors import UsageError

        raise UsageError(f"tune budget {value!r} is negative")
    return seconds


@dataclass(frozen=True)
class Options:
    tune_budget: float | str = option(0.0, "MetaSchedule tuning budget, e.g. 600, 90s, 10m, 1h (0: untuned)",
                                      check=parse_budget)
    tune_batch: int = option(1, "batch size a tuned build is specialized for")
    tuning_db: str | None = option(None, "folder of the tuning database (default: per target, in the cache)")
    tune_trials_per_task: int = option(0, "MetaSchedule trials per task (0: derived from the budget)")


BACKEND = Backend(
    name="tvm",
    summary="Apache TVM: compiled shared library, cross-compiled for aarch64, optional MetaSchedule tuning",
    options=Options,
    build="edgeml.backends.tvm.build:TvmCompiler",
    run="edgeml.backends.tvm.run:TvmBackend",
    errors="edgeml.backends.tvm.errors:TABLE",
)
