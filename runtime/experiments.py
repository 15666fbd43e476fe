"""Device side of fleet experiments: shadow mirroring, A/B routing, Thompson sampling, feedback.

``Experiment`` plugs into the v2 server (``ModelServer.experiments``) through three calls the data
plane makes: ``route`` (which version answers a request for the experiment's model when the client
named no version), ``answered`` (after each answer: remember the request id for feedback, count the
arm, maybe mirror to the shadow) and ``feedback`` (``POST /v2/models/{m}/feedback``).

Shadow: the champion answers every request; a sampled share is offered to a bounded queue and run on
the challenger by one worker thread, never on the request path. A full queue drops the sample (counted
as ``dropped``): the client's answer and latency never depend on the challenger.

A/B: ``split_by="request"`` picks the arm by a hash of the sticky key (header ``X-Experiment-Key``,
else the request id), so a user who sends the same key always sees the same version; ``split_by=
"device"`` serves the one arm the manager gave this device.

Bandit: Thompson sampling per request, Beta(1+s, 1+f) for binary rewards, Normal(mean, sd/sqrt(n)) for
continuous ones; the posterior adds this device's outcomes to the fleet's (sent by the manager,
excluding this device), so every device learns from the whole fleet.

numpy only (no scipy on devices). The counters are cumulative since the experiment started on this
device: the manager keeps the latest report per device and adds them up (a lost message loses nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeml.errors import UsageError
from edgeml.runtime.server.metrics import LATENCY_BUCKETS_MS, Histogram

log = logging.getLogger("edgeml.runtime.experiments")
MODES = ("shadow", "ab", "bandit")
REWARDS = ("binary", "continuous")
MAX_REMEMBERED = 10_000          # request ids kept for feedback (oldest forgotten first)
SHADOW_QUEUE = 64                # mirrored requests waiting for the challenger; more are dropped
MAX_FEEDBACK_BYTES = 4096


@dataclass
class ArmPrior:
    """The fleet's outcomes for one arm, without this device's (bandit posteriors)."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0


@dataclass
class ExperimentSpec:
    id: str
    model: str
    champion: str                 # versions
    challenger: str
    mode: str                     # shadow | ab | bandit
    sample: float = 0.1           # shadow: share of requests mirrored
    split: float = 0.5            # ab: share of requests (or devices) on the challenger
    split_by: str = "request"     # ab: request | device
    device_arm: str | None = None  # ab by device: the version this device serves
    reward: str = "binary"        # binary | continuous
    priors: dict[str, ArmPrior] = field(default_factory=dict)   # bandit: version -> fleet outcomes

    def check(self) -> "ExperimentSpec":
        if self.mode not in MODES:
            raise UsageError(f"experiment mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.reward not in REWARDS:
            raise UsageError(f"experiment reward {self.reward!r} is not one of {', '.join(REWARDS)}")
        if not (0.0 < self.sample <= 1.0 and 0.0 <= self.split <= 1.0):
            raise UsageError("experiment sample must be in (0, 1] and split in [0, 1]")
        if self.champion == self.challenger:
            raise UsageError("the champion and the challenger must be different versions")
        if self.split_by not in ("request", "device"):
            raise UsageError(f"experiment split_by {self.split_by!r} is not request or device")
        return self


class _Arm:
    def __init__(self, version: str, failures_at_start: int):
        self.version = version
        self.requests = 0
        self.latency = Histogram(LATENCY_BUCKETS_MS)
        self.failures_at_start = failures_at_start
        self.feedback = 0
        self.reward_sum = 0.0
        self.reward_sq = 0.0


class _Shadow:
    def __init__(self) -> None:
        self.mirrored = self.dropped = self.compared = self.agree = self.failures = 0
        self.err_sum = self.err_sq = 0.0
        self.latency = Histogram(LATENCY_BUCKETS_MS)


class Experiment:
    """One running experiment on one device's server (see the module docstring)."""

    def __init__(self, spec: ExperimentSpec, server: Any, *, rng: random.Random | None = None):
        self.spec = spec.check()
        self.server = server
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.arms = {v: _Arm(v, self._failures(v)) for v in (spec.champion, spec.challenger)}
        self._seen: OrderedDict[str, tuple[str, Any]] = OrderedDict()   # request id -> (version, top-1)
        self.shadow = _Shadow() if spec.mode == "shadow" else None
        self._queue: queue.Queue[tuple[dict[str, Any], dict[str, Any]] | None] = queue.Queue(SHADOW_QUEUE)
        self._worker: threading.Thread | None = None
        if self.shadow is not None:
            self._worker = threading.Thread(target=self._shadow_loop, name=f"edgeml-shadow-{spec.id}", daemon=True)
            self._worker.start()

    def _failures(self, version: str) -> int:
        try:
            return int(self.server.repo.resolve(self.spec.model, version).stats.failures)
        except Exception:  # noqa: BLE001 - not loaded (yet): counted from zero
            return 0

    # -- the data plane's calls (event-loop thread) ---------------------------------
    def route(self, name: str, version: str | None, rid: str, key: str | None) -> str | None:
        """The version that answers: the client's explicit version always wins."""
        s = self.spec
        if name != s.model or version is not None or s.mode == "shadow":
            return version
        if s.mode == "ab":
            if s.split_by == "device":
                return s.device_arm or s.champion
            return s.challenger if _unit_hash(key or rid) < s.split else s.champion
        return self._thompson()

    def answered(self, lm: Any, rid: str, feeds: dict[str, Any], outputs: dict[str, Any], latency_ms: float) -> None:
        s = self.spec
        if lm.name != s.model or lm.version not in self.arms:
            return
        with self._lock:
            arm = self.arms[lm.version]
            arm.requests += 1
            arm.latency.observe(latency_ms)
            self._seen[rid] = (lm.version, _top1(outputs))
            if len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)
        if self.shadow is not None and lm.version == s.champion and self._rng.random() < s.sample:
            try:
                self._queue.put_nowait((feeds, outputs))
                self.shadow.mirrored += 1
            except queue.Full:
                self.shadow.dropped += 1

    def feedback(self, name: str, body: bytes) -> dict[str, Any]:
        """``{"id": request id, "label": ...}`` or ``{"id": ..., "reward": number}``; returns what was recorded."""
        from edgeml.runtime.server.protocol import BadRequest, NotFound

        if name != self.spec.model:
            raise NotFound(f"no experiment runs on model {name!r} (this device's experiment is on {self.spec.model!r})")
        doc = _feedback_doc(body)
        rid = doc["id"]
        with self._lock:
            seen = self._seen.get(rid)
        if seen is None:
            raise NotFound(f"request id {rid[:64]!r} is unknown here (answered on another device, or older than"
                           f" the last {MAX_REMEMBERED} requests)")
        version, top1 = seen
        if "label" in doc:
            reward = 1.0 if top1 is not None and _same_label(doc["label"], top1) else 0.0
        else:
            reward = doc["reward"]
            if self.spec.reward == "binary" and reward not in (0, 1):
                raise BadRequest(f"this experiment's reward is binary: 'reward' must be 0 or 1, got {reward!r}")
        with self._lock:
            if self._seen.pop(rid, None) is None:
                raise BadRequest(f"request id {rid[:64]!r} already has feedback")
            arm = self.arms[version]
            arm.feedback += 1
            arm.reward_sum += reward
            arm.reward_sq += reward * reward
        return {"id": rid, "version": version, "reward": reward}

    # -- bandit ----------------------------------------------------------------------
    def _thompson(self) -> str:
        best, best_draw = self.spec.champion, -math.inf
        with self._lock:
            stats = [(v, a.feedback, a.reward_sum, a.reward_sq) for v, a in self.arms.items()]
        for version, n_local, s_local, q_local in stats:
            prior = self.spec.priors.get(version, ArmPrior())
            n, total, sq = prior.n + n_local, prior.total + s_local, prior.squares + q_local
            if self.spec.reward == "binary":
                draw = self._rng.betavariate(1.0 + total, 1.0 + max(n - total, 0.0))
            else:
                mean = total / n if n else 0.0
                var = (sq - n * mean * mean) / (n - 1) if n > 1 else 1.0
                draw = self._rng.gauss(mean, math.sqrt(max(var, 1e-12) / max(n, 1)))
            if draw > best_draw:
                best, best_draw = version, draw
        return best

    def set_priors(self, priors: dict[str, ArmPrior]) -> None:
        self.spec.priors = priors

    # -- shadow ----------------------------------------------------------------------
    def _shadow_loop(self) -> None:
        assert self.shadow is not None
        sh = self.shadow
        while True:
            item = self._queue.get()
            if item is None:
                return
            feeds, champion_out = item
            try:
                lm = self.server.repo.resolve(self.spec.model, self.spec.challenger)
                t0 = time.perf_counter()
                out = lm.model.predict(feeds)
                ms = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # noqa: BLE001 - a failing challenger is a result, not a crash
                with self._lock:
                    sh.failures += 1
                log.debug("shadow run failed: %s", exc)
                continue
            agree, rows, err, err_sq = _compare(champion_out, out)
            with self._lock:
                sh.latency.observe(ms)
                sh.compared += rows
                sh.agree += agree
                sh.err_sum += err
                sh.err_sq += err_sq

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Tests and the demo: wait until every mirrored request was compared or failed."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and (self._queue.unfinished_tasks and not self._queue.empty()):
            time.sleep(0.01)
        time.sleep(0.05)

    def close(self) -> None:
        if self._worker is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                with self._queue.mutex:
                    self._queue.queue.clear()
                self._queue.put_nowait(None)
            self._worker.join(5)

    # -- telemetry ---------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Cumulative counters since start, on the server's latency edges (the agent projects them)."""
        arms = []
        with self._lock:
            for v, a in self.arms.items():
                failed = max(self._failures(v) - a.failures_at_start, 0)
                # requests = answered + failed, as the server counts them, so failures / requests is a rate
                arms.append({"version": v, "requests": a.requests + failed, "failures": failed,
                             "latency_buckets_ms": dict(a.latency.cumulative()), "latency_sum_ms": round(a.latency.sum, 3),
                             "feedback": a.feedback, "reward_sum": round(a.reward_sum, 6),
                             "reward_sq": round(a.reward_sq, 6)})
            shadow = None
            if self.shadow is not None:
                sh = self.shadow
                shadow = {"mirrored": sh.mirrored, "dropped": sh.dropped, "compared": sh.compared, "agree": sh.agree,
                          "failures": sh.failures, "err_sum": round(sh.err_sum, 6), "err_sq": round(sh.err_sq, 6),
                          "latency_buckets_ms": dict(sh.latency.cumulative()),
                          "latency_sum_ms": round(sh.latency.sum, 3)}
        return {"experiment": self.spec.id, "mode": self.spec.mode, "arms": arms, "shadow": shadow}


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) from the sticky key (same key -> same arm, on every device)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64


def _is_classifier(arr: np.ndarray) -> bool:
    return arr.ndim >= 2 and arr.shape[-1] > 1 and np.issubdtype(arr.dtype, np.floating)


def _first(outputs: dict[str, Any]) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())))


def _top1(outputs: dict[str, Any]) -> Any:
    """The first row's predicted class (classifier scores) or value (regressor), for label feedback."""
    try:
        arr = _first(outputs)
    except StopIteration:
        return None
    if arr.size == 0:
        return None
    if _is_classifier(arr):
        return int(arr.reshape(-1, arr.shape[-1])[0].argmax())
    flat = arr.ravel()
    return flat[0].item() if np.issubdtype(flat.dtype, np.number) else None


def _same_label(label: Any, top1: Any) -> bool:
    if isinstance(label, bool) or not isinstance(label, (int, float, str)):
        return False
    try:
        return float(label) == float(top1)
    except (TypeError, ValueError):
        return str(label) == str(top1)


def _compare(a_out: dict[str, Any], b_out: dict[str, Any]) -> tuple[int, int, float, float]:
    """(top-1 agreements, rows, sum |error|, sum error^2) between champion and challenger outputs."""
    a, b = _first(a_out), _first(b_out)
    if a.shape != b.shape:
        rows = a.shape[0] if a.ndim else 1
        return 0, rows, float(rows), float(rows)
    if _is_classifier(a):
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        same = int((a2.argmax(axis=1) == b2.argmax(axis=1)).sum())
        diff = np.abs(a2.astype(np.float64) - b2).mean(axis=1)
        return same, a2.shape[0], float(diff.sum()), float((diff * diff).sum())
    a2 = a.reshape(a.shape[0] if a.ndim else 1, -1).astype(np.float64)
    diff = np.abs(a2 - b.reshape(a2.shape)).mean(axis=1)
    same = int((diff <= 1e-6 * (1 + np.abs(a2).mean(axis=1))).sum())
    return same, a2.shape[0], float(diff.sum()), float((diff * diff).sum())


def _feedback_doc(body: bytes) -> dict[str, Any]:
    from edgeml.runtime.server.protocol import BadRequest

    if len(body) > MAX_FEEDBACK_BYTES:
        raise BadRequest(f"feedback body is over {MAX_FEEDBACK_BYTES} bytes; send one outcome per request")
    try:
        doc = json.loads(body or b"null", parse_constant=lambda c: None)
    except (ValueError, RecursionError):
        raise BadRequest('feedback body is not JSON; send {"id": "<request id>", "label": ...} or'
                         ' {"id": ..., "reward": number}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not doc["id"]:
        raise BadRequest("feedback needs 'id': the X-Request-ID of the answered request (a string)")
    if ("label" in doc) == ("reward" in doc):
        raise BadRequest("feedback needs exactly one of 'label' (the true class) or 'reward' (a number)")
    if "reward" in doc:
        r = doc["reward"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise BadRequest(f"feedback 'reward' must be a finite number, got {str(r)[:40]!r}")
        doc["reward"] = float(r)
    unknown = set(doc) - {"id", "label", "reward"}
    if unknown:
        raise BadRequest(f"feedback has unknown fields {sorted(unknown)[:5]}; allowed: id, label, reward")
    return doc
