"""failure_rate: share of the current wave's devices that failed (or timed out) installing."""

from edgeml.fleet.gates import Gate, GateContext


class FailureRateGate(Gate):
    name = "failure_rate"

    def measure(self, ctx: GateContext):
        if ctx.wave_devices == 0:
            return None, "empty wave"
        return ctx.failed / ctx.wave_devices, f"{ctx.failed}/{ctx.wave_devices} devices failed in wave {ctx.wave + 1}"


def current_counts(counts: dict[str, int]) -> tuple[int, int]:
    """(failed, devices) of a wave from its status counts (failed and timed out both count as failed)."""
    return counts.get("failed", 0) + counts.get("timeout", 0), sum(counts.values())


def refresh_result(result: dict, wave: int, counts: dict[str, int], inclusive: bool = True) -> dict:
    """A stored failure_rate result with the wave's CURRENT numbers: a late joiner or a device failing after
    the result was written changes the counts, and the stored text ("0/3 devices failed") would contradict
    the wave's counts beside it. Other gates are returned as stored."""
    failed, devices = current_counts(counts)
    if result.get("gate") != "failure_rate" or devices == 0:
        return result
    detail = f"{failed}/{devices} devices failed in wave {wave + 1}"
    if detail == result.get("detail"):
        return result
    value = round(failed / devices, 6)
    threshold = float(result.get("threshold", 0.0))
    ok = value <= threshold if inclusive else value < threshold    # the rollout's own gate: max_failure_rate is allowed
    return {**result, "value": value, "ok": ok, "detail": detail}


def refresh_reason(reason: str | None, wave: int, counts: dict[str, int]) -> str | None:
    """A failure-rate breach reason keeps the numbers AT the breach and adds today's when they moved on."""
    failed, devices = current_counts(counts)
    if not reason or not reason.startswith("gate failure_rate breached") or devices == 0:
        return reason
    if f" {failed}/{devices} devices failed in wave {wave + 1}" in reason:
        return reason
    return f"{reason}; {failed}/{devices} failed by now"
