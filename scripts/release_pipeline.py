#!/usr/bin/env python3
"""Release pipeline: a changed model -> compiled, gated, signed artifact -> fleet store -> canary rollout -> report.

    python scripts/release_pipeline.py --model model.onnx --name digits --version 1.3.0 --target x86_64 \\
        --eval eval.npz --sign-key release.key --trusted-key release.key.pub \\
        --releases releases/ --fleet-db fleet.db --canary-selector ring=canary --report-dir out/

Every step drives edgeml's public CLI (``python -m edgeml.cli``) or ``edgeml.load``, exactly what a team runs:

1. change: sha256 of the model (+ calib/eval); unchanged since the last release -> nothing to do (exit 0).
2. compile: ``edgeml compile ... --sign-key KEY --json`` (edgeml signs at compile time; there is no separate
   sign command, so the key is handed to compile and the *sign* step verifies the signature with the public key).
3. accuracy gate: top-1 of the previous release and of the candidate on the same eval set (``edgeml.load``);
   fails when the candidate is more than ``--max-accuracy-drop`` points worse.
4. speed gate: ``edgeml bench run`` of both, then ``edgeml bench compare previous.json candidate.json``; fails
   when p50 latency is *worse* beyond noise and slower by more than ``--max-slowdown``.
5. sign: the candidate must verify against ``--trusted-key`` (what every device checks).
6. publish: ``edgeml fleet publish --trusted-key``.
7. canary: ``edgeml fleet rollout start NAME@VERSION --selector CANARY --gate ...`` on the running manager, then
   ``edgeml fleet rollout status --json`` until it completes (pass) or is rolled back / aborted / times out (fail).
8. record: the artifact and its release.json become the previous release for the next run (only on success).

Writes ``pipeline.json`` and ``pipeline.md`` to --report-dir. Exit codes: 0 released (or unchanged),
1 a gate stopped the release (regression), 2 bad input or a failed tool.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_GATE, EXIT_ERROR = 0, 1, 2
FINAL_ROLLOUT_STATES = {"completed", "rolled_back", "aborted"}


class GateFailed(Exception):
    """A gate stopped the release: the candidate is a regression."""


class PipelineError(Exception):
    """Bad input or a tool that failed (not a verdict on the model)."""


@dataclass
class Step:
    name: str
    status: str = "pending"            # passed | failed | skipped | error
    seconds: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    name: str
    version: str
    previous: str | None
    outcome: str = "running"           # released | unchanged | stopped | error
    steps: list[Step] = field(default_factory=list)
    artifact: str | None = None
    rollout_id: str | None = None


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.report_dir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.releases = Path(args.releases).resolve() / args.name
        self.previous = self._previous_release()
        self.report = Report(name=args.name, version=args.version,
                             previous=self.previous["version"] if self.previous else None)
        self.candidate = self.work / f"{args.name}-{args.version}.edgepkg"

    # ------------------------------------------------------------------ helpers
    def edgeml(self, *argv: str, what: str, timeout: float = 900) -> Any:
        """Run ``edgeml ARGV --json``; its JSON on success, PipelineError with its message otherwise."""
        cmd = [*self.args.edgeml.split(), *argv, "--json"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise PipelineError(f"{what}: `{' '.join(cmd[:4])} ...` ran past {timeout:.0f}s") from exc
        if proc.returncode != 0:
            raise PipelineError(f"{what} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{what}: output is not JSON: {proc.stdout[-500:]}") from exc

    def _previous_release(self) -> dict[str, Any] | None:
        latest = self.releases / "latest.json"
        if not latest.exists():
            return None
        try:
            record = json.loads(latest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{latest} is unreadable ({exc}); restore it or remove it to release afresh") from exc
        if not (self.releases / record["version"] / record["artifact"]).exists():
            raise PipelineError(f"{latest} names {record['version']} but its artifact is missing")
        return record

    def previous_artifact(self) -> Path | None:
        if not self.previous:
            return None
        return self.releases / self.previous["version"] / self.previous["artifact"]

    def run_step(self, name: str, func) -> Step:
        step = Step(name)
        self.report.steps.append(step)
        start = time.monotonic()
        try:
            result = func(step)
            step.status = result or "passed"
        except GateFailed as exc:
            step.status, step.detail = "failed", str(exc)
            raise
        except PipelineError as exc:
            step.status, step.detail = "error", str(exc)
            raise
        finally:
            step.seconds = round(time.monotonic() - start, 2)
        return step

    # ------------------------------------------------------------------ steps
    def inputs(self) -> list[Path]:
        paths = [Path(self.args.model)] + [Path(p) for p in (self.args.calib, self.args.eval) if p]
        for path in paths:
            if not path.is_file():
                raise PipelineError(f"{path} does not exist (--model/--calib/--eval)")
        return paths

    def step_change(self, step: Step) -> str:
        step.data["model_sha256"] = self.model_sha = sha256_files(self.inputs())
        if self.previous and self.previous.get("model_sha256") == self.model_sha and not self.args.force:
            step.detail = f"model and data unchanged since {self.previous['version']}: nothing to release"
            return "skipped"
        if self.previous and self.previous["version"] == self.args.version:
            raise PipelineError(f"version {self.args.version} is already released with another model; bump --version")
        step.detail = "new model" if not self.previous else f"changed since {self.previous['version']}"
        return "passed"

    def step_compile(self, step: Step) -> None:
        a = self.args
        argv = ["compile", a.model, "--target", a.target, "--output", str(self.candidate), "--name", a.name,
                "--version", a.version, "--sign-key", a.sign_key, "--max-accuracy-drop", str(a.max_accuracy_drop)]
        argv += ["--calib", a.calib] if a.calib else []
        argv += ["--eval", a.eval] if a.eval else []
        argv += list(a.compile_arg)
        out = self.edgeml(*argv, what="edgeml compile")
        step.data = {"backend": _dig(out, "selected", "backend"), "precision": _dig(out, "selected", "precision")}
        step.detail = f"{self.candidate.name}"
        self.report.artifact = str(self.candidate)

    def step_accuracy(self, step: Step) -> str:
        prev = self.previous_artifact()
        if prev is None or not self.args.eval:
            step.detail = "no previous release" if prev is None else "no --eval data"
            return "skipped"
        before, after = top1(prev, Path(self.args.eval)), top1(self.candidate, Path(self.args.eval))
        drop = before - after
        step.data = {"previous_top1": before, "candidate_top1": after, "drop_points": drop,
                     "max_drop_points": self.args.max_accuracy_drop}
        step.detail = f"top-1 {before:.2f} -> {after:.2f} ({-drop:+.2f} points)"
        if drop > self.args.max_accuracy_drop:
            raise GateFailed(f"accuracy regression: top-1 {before:.2f} -> {after:.2f}, a drop of {drop:.2f} points "
                             f"> --max-accuracy-drop {self.args.max_accuracy_drop}")
        return "passed"

    def bench(self, artifact: Path, label: str) -> Path:
        out = self.work / f"bench-{label}"
        self.edgeml("bench", "run", str(artifact), "--scenario", "single-stream", "--duration", self.args.bench_duration,
                    "--repeats", str(self.args.bench_repeats), "--warmup", "0.2s", "--no-sweep",
                    "--report", str(out), what=f"edgeml bench run ({label})")
        return out / "result.json"

    def step_speed(self, step: Step) -> str:
        prev = self.previous_artifact()
        if prev is None:
            step.detail = "no previous release"
            return "skipped"
        base, cand = self.bench(prev, "previous"), self.bench(self.candidate, "candidate")
        cmp = self.edgeml("bench", "compare", str(base), str(cand), "--label", "previous", "--label", "candidate",
                          "--report", str(self.work / "bench-compare"), what="edgeml bench compare")
        p50 = cmp["comparisons"][0]["metrics"]["p50_ms"]
        step.data = {"p50_ratio": p50["ratio"], "verdict": p50["verdict"], "rule": p50["rule"],
                     "max_slowdown": self.args.max_slowdown}
        step.detail = f"p50 {p50['a']['median']:.4f} -> {p50['b']['median']:.4f} ms (x{p50['ratio']:.3f}, {p50['verdict']})"
        if p50["verdict"] == "worse" and p50["ratio"] > 1.0 + self.args.max_slowdown:
            raise GateFailed(f"speed regression: p50 x{p50['ratio']:.3f} ({p50['rule']}) "
                             f"> 1 + --max-slowdown {self.args.max_slowdown}")
        return "passed"

    def step_sign(self, step: Step) -> None:
        import edgeml
        from edgeml.errors import EdgemlError

        try:
            edgeml.load(self.candidate, trusted_keys=[Path(self.args.trusted_key)], require_signature=True)
        except EdgemlError as exc:
            raise PipelineError(f"the candidate does not verify against {self.args.trusted_key}: {exc}") from exc
        step.detail = f"signature verifies against {Path(self.args.trusted_key).name}"

    def step_publish(self, step: Step) -> None:
        argv = ["fleet", "publish", str(self.candidate), "--db", self.args.fleet_db, "--trusted-key", self.args.trusted_key]
        argv += ["--store", self.args.store] if self.args.store else []
        out = self.edgeml(*argv, what="edgeml fleet publish")
        step.data = {"sha256": out.get("sha256"), "size": out.get("size")}
        step.detail = f"{self.args.name}@{self.args.version} in the fleet store"

    def step_canary(self, step: Step) -> str:
        a = self.args
        argv = ["fleet", "rollout", "start", f"{a.name}@{a.version}", "--db", a.fleet_db, "--selector", a.canary_selector,
                "--waves", a.canary_waves, "--bake", a.canary_bake, "--max-failure-rate", a.canary_max_failure_rate]
        for gate in a.gate:
            argv += ["--gate", gate]
        if a.health_window:
            argv += ["--health-window", a.health_window]
        started = self.edgeml(*argv, what="edgeml fleet rollout start")
        rid = self.report.rollout_id = str(started["id"])
        deadline = time.monotonic() + a.rollout_timeout
        status = started
        while status["state"] not in FINAL_ROLLOUT_STATES and time.monotonic() < deadline:
            time.sleep(0.5)
            status = self.edgeml("fleet", "rollout", "status", rid, "--db", a.fleet_db, what="edgeml fleet rollout status")
        step.data = {"rollout": rid, "state": status["state"], "gates": status.get("gates", []),
                     "failures": status.get("failures", [])[:10], "per_wave": status.get("per_wave", [])}
        if status["state"] not in FINAL_ROLLOUT_STATES:
            self.edgeml("fleet", "rollout", "rollback", rid, "--db", a.fleet_db, what="edgeml fleet rollout rollback")
            raise GateFailed(f"canary rollout {rid} did not finish within {a.rollout_timeout:.0f}s; rolled back")
        if status["state"] != "completed":
            raise GateFailed(f"canary rollout {rid} ended {status['state']}: {status.get('reason') or 'a gate failed'}")
        step.detail = f"rollout {rid} completed on {a.canary_selector or 'all devices'}"
        return "passed"

    def step_record(self, step: Step) -> None:
        dest = self.releases / self.args.version
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.candidate, dest / self.candidate.name)
        record = {"name": self.args.name, "version": self.args.version, "artifact": self.candidate.name,
                  "model_sha256": self.model_sha, "rollout_id": self.report.rollout_id, "released_at": time.time()}
        write_atomic(dest / "release.json", json.dumps(record, indent=2))
        write_atomic(self.releases / "latest.json", json.dumps(record, indent=2))
        step.detail = f"{self.args.version} is now the previous release"

    # ------------------------------------------------------------------ driver
    def run(self) -> int:
        steps = [("change", self.step_change), ("compile", self.step_compile), ("accuracy-gate", self.step_accuracy),
                 ("speed-gate", self.step_speed), ("sign", self.step_sign), ("publish", self.step_publish),
                 ("canary", self.step_canary), ("record", self.step_record)]
        code = EXIT_OK
        try:
            for name, func in steps:
                step = self.run_step(name, func)
                if name == "change" and step.status == "skipped":
                    self.report.outcome = "unchanged"
                    break
            else:
                self.report.outcome = "released"
        except GateFailed:
            self.report.outcome, code = "stopped", EXIT_GATE
        except PipelineError:
            self.report.outcome, code = "error", EXIT_ERROR
        self.write_report()
        return code

    def write_report(self) -> None:
        data = asdict(self.report)
        write_atomic(self.work / "pipeline.json", json.dumps(data, indent=2, default=str))
        write_atomic(self.work / "pipeline.md", markdown(self.report))


def top1(artifact: Path, eval_npz: Path) -> float:
    """Top-1 accuracy (points) of ARTIFACT on EVAL (inputs keyed by name + ``labels``), via edgeml.load."""
    import numpy as np

    import edgeml

    model = edgeml.load(artifact)
    with np.load(eval_npz) as data:
        if "labels" not in data.files:
            raise PipelineError(f"{eval_npz} has no 'labels' array; the accuracy gate needs class labels")
        labels = data["labels"]
        feeds = {k: data[k] for k in data.files if k != "labels" and not k.startswith("reference_")}
    outputs = model.predict(feeds)
    logits = next(iter(outputs.values()))
    return float((np.argmax(logits, axis=1) == labels).mean() * 100.0)


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def markdown(report: Report) -> str:
    lines = [f"# Release {report.name}@{report.version}: {report.outcome}", "",
             f"Previous release: {report.previous or 'none'}" + (f"; rollout {report.rollout_id}" if report.rollout_id else ""),
             "", "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in report.steps:
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model file (.onnx) whose change triggers a release")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, help="SemVer of this release")
    p.add_argument("--target", default="x86_64")
    p.add_argument("--calib")
    p.add_argument("--eval", help="eval .npz with labels: the accuracy gate compares top-1 on it")
    p.add_argument("--sign-key", required=True)
    p.add_argument("--trusted-key", required=True, help="the public key devices trust")
    p.add_argument("--releases", required=True, help="folder holding released artifacts (NAME/VERSION/, latest.json)")
    p.add_argument("--fleet-db", required=True, help="the fleet manager's SQLite file")
    p.add_argument("--store", help="the fleet manager's artifact store (default beside the db)")
    p.add_argument("--report-dir", required=True)
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="points of top-1 (default 1.0)")
    p.add_argument("--max-slowdown", type=float, default=0.10, help="allowed p50 slowdown beyond noise (0.10 = 10%%)")
    p.add_argument("--bench-duration", default="2s")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--canary-selector", default="ring=canary")
    p.add_argument("--canary-waves", default="100%")
    p.add_argument("--canary-bake", default="30s")
    p.add_argument("--canary-max-failure-rate", default="0%")
    p.add_argument("--gate", action="append", default=[], help="extra rollout gate (repeatable), e.g. p95_ratio<1.2")
    p.add_argument("--health-window", help="override the agents' health window for the canary")
    p.add_argument("--rollout-timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--compile-arg", action="append", default=[], help="extra `edgeml compile` argument (repeatable)")
    p.add_argument("--force", action="store_true", help="release even when the model is unchanged")
    p.add_argument("--edgeml", default=f"{sys.executable} -m edgeml.cli", help="how to run the edgeml CLI")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pipeline = Pipeline(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    code = pipeline.run()
    print(markdown(pipeline.report))
    for step in pipeline.report.steps:
        if step.status in ("failed", "error"):
            print(f"{step.name}: {step.detail}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
