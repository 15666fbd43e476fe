"""Every status the fleet stores or sends, as str Enums (one place; the SQL CHECKs are built from these).

A value is its own wire/SQL spelling (``RolloutState.RUNNING == "running"``), so
rows and JSON keep their text while code compares against names, never against
the start of a free-text reason.
"""

from __future__ import annotations

from enum import StrEnum


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class DeviceStatus(StrEnum):
    """One device in one rollout (``rollout_devices.status``) and one deployment (``deployments.status``)."""
    PENDING = "pending"
    SENT = "sent"
    INSTALLING = "installing"
    COMMITTED = "committed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SUPERSEDED = "superseded"     # a newer desired state (e.g. the rollback) replaced it: not a failure
    SKIPPED = "skipped"           # its wave never started (the rollout was rolled back first)


class RollbackStatus(StrEnum):
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SUPERSEDED = "superseded"


class DeploymentKind(StrEnum):
    INSTALL = "install"
    ROLLBACK = "rollback"


class CommandStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    ERROR = "error"
    EXPIRED = "expired"


class InstallState(StrEnum):
    """``event.state`` and the agent's ``heartbeat.state`` (IDLE / NOT_SERVING only in heartbeats)."""
    IDLE = "idle"
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    SELFTEST = "selftest"
    SWAPPED = "swapped"
    HEALTH = "health"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    NOT_SERVING = "not_serving"   # the committed model stopped answering on this device (also an event)
    SERVING = "serving"           # event only: it answers again after NOT_SERVING


class FailureCode(StrEnum):
    """``code`` of a failed / rolled_back event and of ``last_failed``: why, for machines (``reason`` is for people)."""
    SUPERSEDED = "superseded"             # a newer desired state replaced it before it finished
    DOWNLOAD = "download"                 # HTTP 4xx, wrong size, retries exhausted, hash mismatch
    VERIFICATION = "verification"         # sha256 / signature / name-version check
    TARGET = "target"                     # this host cannot run the artifact's target
    SELFTEST = "selftest"
    SWAP = "swap"
    HEALTH = "health"
    GAVE_UP = "gave_up"                   # too many restarts during the install
    SLOT_INVALID = "slot_invalid"         # a committed slot failed re-verification at start
    NOT_READY = "not_ready"               # the served model stopped answering
    ERROR = "error"                       # anything else (see reason)


FINAL_FAILURES = (InstallState.FAILED, InstallState.ROLLED_BACK, InstallState.REFUSED)


def sql_in(enum: type[StrEnum]) -> str:
    """``('a','b',...)`` for a CHECK / trigger over an enum's values."""
    return "(" + ",".join(f"'{m.value}'" for m in enum) + ")"
