"""``edgeml fleet experiment start|status|promote|stop``: thin click layer over edgeml.fleet.experiments.

Start/promote/stop go to the running manager through the commands table (like rollouts); status reads the
database directly and computes the statistics here (scipy, manager side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgeml.cli import emit, examples, handle_errors, json_option


def _db(db: Path | str | None) -> Path | str:
    from edgeml.fleet.cli import _db_path

    return _db_path(db)


def _fmt_ci(ci: list[float | None]) -> str:
    return "[" + ", ".join("?" if v is None else f"{v:.4g}" for v in ci) + "]"


def status_text(s: dict[str, Any]) -> str:
    lines = [f"experiment {s['name']} ({s['id']}) {s['mode']} on {s['model']}: {s['state']},"
             f" {s['reporting']}/{s['devices']} devices reporting"]
    for a in s["arms"]:
        lines.append(f"  {a['role']:<10} {a['version']:<10} requests {a['requests']:>7}  failures {a['failures']:>4}"
                     f"  p95 {a['p95_ms']} ms  feedback {a['feedback']:>6}  outcome {a['outcome']:.4g}"
                     f" {_fmt_ci(a['outcome_ci'])}")
    if "shadow" in s:
        sh = s["shadow"]
        lines.append(f"  shadow: mirrored {sh['mirrored']}, dropped {sh['dropped']}, compared {sh['compared']},"
                     f" agreement {sh['agreement']:.4f} {_fmt_ci(sh['agreement_ci'])}, mean |error|"
                     f" {sh['mean_abs_error']:.4g}, challenger p95 {sh['challenger_p95_ms']} ms, failures {sh['failures']}")
    if s.get("test"):
        t = s["test"]
        lines.append(f"  {t['test']}: effect {t['effect']:+.4g} CI [{t['ci_low']:.4g}, {t['ci_high']:.4g}]"
                     f" p={t['p_value']:.4g}")
    if s.get("latency_test"):
        t = s["latency_test"]
        lines.append(f"  latency {t['test']}: P(challenger slower) {t['effect']:.3f} p={t['p_value']:.4g}")
    if "bandit" in s:
        b = s["bandit"]
        lines.append(f"  bandit: share {b['share']}, regret {b['regret']} (uniform split: {b['regret_if_uniform']})")
    d = s["decision"]
    need = f", {d['samples_needed_per_arm']} more outcomes per arm" if d.get("samples_needed_per_arm") else ""
    lines.append(f"  decision: {d['decision']}{need} ({d['reason']})")
    return "\n".join(lines)


def register(fleet_group: click.Group) -> None:
    from edgeml.fleet.cli import DB_HELP, DB_TYPE

    @fleet_group.group("experiment")
    def experiment_group() -> None:
        """Shadow, A/B and bandit experiments between two versions of a model (docs/experiments.md)."""

    @experiment_group.command("start", epilog=examples(
        "edgeml fleet experiment start digits-ab --champion digits-cnn@1.0.0 --challenger digits-cnn@1.1.0 \\",
        "    --mode ab --selector site=lab",
        "edgeml fleet experiment start digits-shadow --champion digits-cnn@1.0.0 --challenger digits-cnn@1.1.0 \\",
        "    --mode shadow"))
    @click.argument("name")
    @click.option("--champion", required=True, help="NAME@VERSION serving today.")
    @click.option("--challenger", required=True, help="NAME@VERSION to compare (published first).")
    @click.option("--mode", type=click.Choice(["shadow", "ab", "bandit"]), required=True,
                  help="shadow: challenger sees copies, answers are compared; ab: split with a significance test;"
                       " bandit: Thompson sampling shifts traffic to the better arm.")
    @click.option("--selector", default="", help="k=v,... labels of the devices taking part (default all).")
    @click.option("--sample", default="10%", show_default=True, help="shadow: share of requests mirrored.")
    @click.option("--split", default="50%", show_default=True, help="ab: share of traffic on the challenger.")
    @click.option("--split-by", type=click.Choice(["request", "device"]), default="request", show_default=True,
                  help="Assign each request, or each whole device, to an arm.")
    @click.option("--reward", type=click.Choice(["binary", "continuous"]), default="binary", show_default=True,
                  help="binary: success/failure per request; continuous: a score per request.")
    @click.option("--baseline", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
                  help="ab: the champion's expected outcome rate (sizes the test).")
    @click.option("--mde", default=0.05, show_default=True, type=float, help="ab: smallest effect worth detecting.")
    @click.option("--sigma", default=1.0, show_default=True, type=float, help="ab, continuous: reward std. dev.")
    @click.option("--alpha", default=0.05, show_default=True, type=click.FloatRange(0, 0.5, min_open=True),
                  help="A/B: significance level of the test (false-positive rate).")
    @click.option("--power", default=0.8, show_default=True, type=click.FloatRange(0.5, 1, max_open=True),
                  help="A/B: chance of detecting the minimum effect; sets the sample size.")
    @click.option("--duration", default=None, help="Stop by itself after this long (e.g. 1h).")
    @click.option("--db", type=DB_TYPE, help=DB_HELP)
    @json_option
    @handle_errors
    def start_cmd(name, champion, challenger, mode, selector, sample, split, split_by, reward, baseline, mde, sigma,
                  alpha, power, duration, db, as_json):
        """Start experiment NAME: --champion M@1 --challenger M@2 --mode shadow|ab|bandit."""
        from edgeml.fleet.experiments import build_spec
        from edgeml.fleet.protocol import parse_labels
        from edgeml.fleet.service import CommandClient
        from edgeml.fleet.waves import parse_duration, parse_rate

        args = {"name": name, "champion": champion, "challenger": challenger, "mode": mode,
                "selector": parse_labels(selector), "sample": parse_rate(sample), "split": parse_rate(split),
                "split_by": split_by, "reward": reward, "baseline": baseline, "mde": mde, "sigma": sigma,
                "alpha": alpha, "power": power, "duration_s": parse_duration(duration) if duration else None}
        build_spec(args)          # refuse bad options here, before queuing
        emit(CommandClient(_db(db)).submit("experiment.start", args), as_json, status_text)

    @experiment_group.command("status", epilog=examples(
        "edgeml fleet experiment status", "edgeml fleet experiment status digits-ab --json"))
    @click.argument("experiment", required=False)
    @click.option("--db", type=DB_TYPE, help=DB_HELP)
    @json_option
    @handle_errors
    def status_cmd(experiment, db, as_json):
        """One experiment (id or name) with its statistics and decision, or all of them."""
        from edgeml.fleet.db import FleetDB
        from edgeml.fleet.experiments import list_experiments, status

        fdb = FleetDB(_db(db), readonly=True)
        if experiment:
            emit(status(fdb, experiment), as_json, status_text)
        else:
            emit(list_experiments(fdb), as_json, lambda rows: "\n\n".join(map(status_text, rows)) or "no experiments")

    def _op(op: str, doc: str) -> None:
        @experiment_group.command(op, help=doc, epilog=examples(f"edgeml fleet experiment {op} digits-ab"))
        @click.argument("experiment")
        @click.option("--db", type=DB_TYPE, help=DB_HELP)
        @json_option
        @handle_errors
        def cmd(experiment, db, as_json):
            from edgeml.fleet.service import CommandClient

            emit(CommandClient(_db(db)).submit(f"experiment.{op}", {"id": experiment}), as_json, status_text)

    _op("promote", "Stop the experiment and roll the challenger out (a normal rollout, in waves).")
    _op("stop", "Stop the experiment: devices unload the challenger and serve the champion only.")
