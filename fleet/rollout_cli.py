"""``edgeml fleet rollout ...``, ``fleet artifacts`` and ``fleet devices wait/forget``: kubectl-style rollouts.

``rollout start --wait`` and ``rollout status --watch`` follow a rollout to its end, printing the wave table
whenever it changes, and exit non-zero when it ends rolled back or aborted (exit 10, FleetError) or when the
wait times out; ``rollout start`` refuses a target that is not published and names the closest published one.
"""

from __future__ import annotations

import difflib
import sys
import time
from typing import Any, Callable

import click

from edgeml.cli import emit, examples, handle_errors, json_option
from edgeml.cli_format import num as _num
from edgeml.cli_format import table
from edgeml.errors import FleetError
from edgeml.fleet.profiles import apply_profile, profile_option

TERMINAL = ("completed", "aborted", "rolled_back")
POLL_S = 0.5


def _db_opts(func: Any) -> Any:
    from edgeml.fleet.cli import DB_HELP, DB_TYPE

    return click.option("--db", type=DB_TYPE, help=DB_HELP)(func)


def _db_path(db: Any) -> Any:
    from edgeml.fleet.cli import _db_path as path_of

    return path_of(db)


# ====================================================================== rendering
def status_text(s: dict) -> str:
    """A rollout as a header line, an aligned wave table, its gates and its first failures."""
    lines = [f"rollout {s['id']}: {s['target']}  state={s['state']}  wave {min(s['wave'], len(s['waves']))}"
             f"/{len(s['waves'])}  by {s['created_by']}"]
    if s["reason"]:
        lines.append(f"  reason: {s['reason']}")
    rows = [("WAVE", "SIZE", "DEVICES", "WAITING", "INSTALLING", "COMMITTED", "FAILED", "OTHER")]
    for i, (label, w) in enumerate(zip(s["waves"], s["per_wave"])):
        total = sum(w.values())
        waiting, committed = w.get("pending", 0), w.get("committed", 0)
        moving = w.get("sent", 0) + w.get("installing", 0)
        failed = w.get("failed", 0) + w.get("timeout", 0)
        other = total - waiting - committed - moving - failed     # superseded, skipped
        rows.append((str(i + 1), label, str(total) if total else "0 (empty wave)", str(waiting), str(moving),
                     str(committed), str(failed), str(other)))
    lines += ["  " + line for line in table(rows)]
    if s["rollback"]:
        lines.append("  rollback: " + ", ".join(f"{k}={v}" for k, v in sorted(s["rollback"].items())))
    for g in s["gates"]:
        value = "no data yet" if g["value"] is None else f"value={_num(g['value'])}"
        lines.append(f"  gate {g['gate']}: {'ok' if g['ok'] else 'BREACH'} {value} limit={_num(g['threshold'])}"
                     f" ({g['detail']})")
    for f in s["failures"][:5]:
        lines.append(f"  failed {f['device_id']}: {f['reason']}")
    return "\n".join(lines)


# ====================================================================== following a rollout
def follow(db_path: Any, rid: str, *, timeout_s: float, echo: Callable[[str], None] | None) -> dict:
    """Poll the rollout until it ends; print its table on every change. Returns the final status."""
    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.manager import rollout_status

    fdb = FleetDB(db_path, readonly=True)
    deadline = time.monotonic() + timeout_s
    last = None
    try:
        while True:
            s = rollout_status(fdb, rid)
            view = (s["state"], s["wave"], [sorted(w.items()) for w in s["per_wave"]], sorted(s["rollback"].items()),
                    [(g["gate"], g["ok"]) for g in s["gates"]])
            if view != last and echo is not None:
                echo(f"[{time.strftime('%H:%M:%S')}] " + status_text(s))
            last = view
            if s["state"] in TERMINAL:
                return s
            if time.monotonic() > deadline:
                raise FleetError(f"rollout {rid} is still {s['state']} (wave {s['wave']}/{len(s['waves'])}) after"
                                 f" {timeout_s:g}s", hint=f"keep watching: edgeml fleet rollout status {rid} --watch")
            time.sleep(POLL_S)
    finally:
        fdb.close()


def finish(s: dict, as_json: bool) -> None:
    """Print the final status; a rollout that did not complete exits 10 (FleetError) with its reason."""
    if as_json:
        emit(s, True)
    if s["state"] != "completed":
        err = FleetError(f"rollout {s['id']} ({s['target']}) ended {s['state']}" + (f": {s['reason']}" if s["reason"] else ""),
                         hint=f"details: edgeml fleet rollout status {s['id']}")
        if not as_json:
            click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    if not as_json:
        click.echo(f"rollout {s['id']} ({s['target']}) completed")


# ====================================================================== artifacts
def published(db_path: Any) -> list[dict]:
    from edgeml.fleet.db import FleetDB

    fdb = FleetDB(db_path, readonly=True)
    try:
        return [dict(r) for r in fdb.q("SELECT name, version, sha256, size, signed, target, published_at,"
                                        " published_by FROM artifacts ORDER BY name, published_at")]
    finally:
        fdb.close()


def check_published(db_path: Any, spec: str) -> None:
    """Refuse NAME@VERSION that is not published, naming the closest published ones (before queuing anything)."""
    from edgeml.errors import UsageError

    name, at, version = spec.partition("@")
    if not at or not name or not version:
        raise UsageError(f"rollout target {spec!r} must be NAME@VERSION", hint="list them with: edgeml fleet artifacts")
    rows = published(db_path)
    specs = [f"{r['name']}@{r['version']}" for r in rows]
    if spec in specs:
        return
    if not specs:
        raise FleetError(f"{spec} is not published: nothing is published yet",
                         hint="publish it first: edgeml fleet publish ARTIFACT.edgepkg")
    close = difflib.get_close_matches(spec, specs, n=3, cutoff=0.5)
    same_name = [s for s in specs if s.split("@")[0] == name]
    guess = close or same_name
    hint = (f"did you mean {' or '.join(guess[:3])}?" if guess else
            f"published: {', '.join(specs[-5:])}") + " (all: edgeml fleet artifacts)"
    raise FleetError(f"{spec} is not published", hint=hint)


HOST_TARGET_LABEL = "host-target"     # set by `edgeml agent`: the most specific CPU target its host runs


def cannot_run(target: str | None, host_target: str | None) -> str | None:
    """Why a device whose best CPU target is ``host_target`` certainly cannot run an artifact for ``target``
    (None: it can, or it is not known). Certain because the best target is the runnable CPU target with the
    most required features: a CPU target with more features, or another architecture, does not run there."""
    from edgeml.targets import all_targets

    targets = all_targets()
    t, h = targets.get(target or ""), targets.get(host_target or "")
    if t is None or h is None or t.device != "cpu":
        return None
    if t.arch != h.arch:
        return f"{t.arch} artifact on a {h.arch} host"
    have = set(h.required_features)
    if set(t.required_features) <= have:
        return None
    if len(t.required_features) > len(have):
        missing = sorted(set(t.required_features) - have)
        return f"host (best target {h.name}) lacks {', '.join(missing)}"
    return None


def preflight(db_path: Any, spec: str, selector: dict[str, str], force: bool, waves: list | None = None) -> list[str]:
    """Refuse a rollout no selected device can run (FleetError; --force: a warning); warn about the devices
    that cannot. Devices whose agent did not report its host target are not judged."""
    import json

    from edgeml.fleet.db import FleetDB
    from edgeml.fleet.protocol import selector_matches

    name, _, version = spec.partition("@")
    fdb = FleetDB(db_path, readonly=True)
    try:
        art = fdb.one("SELECT target FROM artifacts WHERE name = ? AND version = ?", (name, version))
        devices = {r["device_id"]: json.loads(r["labels"]) for r in fdb.q("SELECT device_id, labels FROM devices")}
    finally:
        fdb.close()
    target = art["target"] if art else None
    chosen = {d: lab for d, lab in devices.items() if selector_matches(selector, lab)}
    notes = _empty_waves(chosen, waves) if waves else []
    bad = {d: why for d, lab in chosen.items() if (why := cannot_run(target, lab.get(HOST_TARGET_LABEL)))}
    if not bad:
        return notes
    listing = "; ".join(f"{d}: {why}" for d, why in sorted(bad.items())[:5]) + (
        f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if len(bad) == len(chosen):
        err = FleetError(f"no selected device can run {spec} (target {target}): {listing}",
                         hint="compile for a target they run (edgeml targets), or pass --force to roll out anyway")
        if not force:
            raise err
        return notes + [f"warning: --force: {err.message}"]
    return notes + [f"warning: {len(bad)} of {len(chosen)} selected devices cannot run {spec} (target {target}) and will"
            f" fail their install (counted by --max-failure-rate): {listing}"]


def _empty_waves(chosen: dict[str, dict[str, str]], waves: list) -> list[str]:
    """A note when some waves get no device (e.g. 1 device and 5%,25%,100%): they are passed at once."""
    from edgeml.fleet.waves import assign_waves, wave_label

    if not chosen:
        return []
    sizes = [len(w) for w in assign_waves("preflight", sorted(chosen), waves, chosen)]
    empty = [f"{i + 1} ({wave_label(w)})" for i, (w, n) in enumerate(zip(waves, sizes)) if n == 0]
    if not empty:
        return []
    return [f"note: {len(chosen)} device(s) selected: wave(s) {', '.join(empty)} get none and pass at once"
            f" (waves per device: {', '.join(str(n) for n in sizes)}; fewer waves, e.g. --waves 100%, say the same)"]


def register(fleet_group: click.Group) -> None:
    @fleet_group.command("artifacts", epilog=examples("edgeml fleet artifacts", "edgeml fleet artifacts --json"))
    @_db_opts
    @json_option
    @handle_errors
    def artifacts_cmd(db, as_json):
        """List the published artifacts (what `rollout start NAME@VERSION` accepts)."""
        rows = published(_db_path(db))

        def human(rows: list[dict]) -> str:
            if not rows:
                return "no artifacts published (edgeml fleet publish ARTIFACT.edgepkg)"
            out = [("ARTIFACT", "TARGET", "SIGNED", "SIZE", "SHA256", "PUBLISHED")]
            for r in rows:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["published_at"])) if r["published_at"] else "-"
                out.append((f"{r['name']}@{r['version']}", r["target"] or "-", "yes" if r["signed"] else "no",
                            _size(r["size"]), r["sha256"][:12], f"{when} by {r['published_by'] or '-'}"))
            return "\n".join(table(out))

        emit(rows, as_json, human)

    @fleet_group.group("rollout")
    def rollout_group() -> None:
        """Start, follow and steer rollouts (the running manager executes them)."""

    @rollout_group.command("start", epilog=examples(
        "edgeml fleet rollout start digits-cnn@1.0.0 --wait",
        "edgeml fleet rollout start digits-cnn@1.1.0 --selector site=lab --waves 50%,100% \\",
        "    --gate p95_latency_ms<20 --wait --timeout 30m"))
    @click.argument("target")
    @_db_opts
    @click.option("--selector", default="", help="k=v,... labels of the devices to update (default all).")
    @click.option("--waves", default="5%,25%,100%", show_default=True,
                  help="Cumulative percentages, or label waves first: ring=canary,50%,100%.")
    @click.option("--max-failure-rate", default="10%", show_default=True,
                  help="Share of a wave's devices that may fail before the rollout rolls back (10% or 0.1).")
    @click.option("--bake", default="60s", show_default=True,
                  help="Wait after each wave commits with gates green before the next -- and after the last before"
                       " 'completed' (a breach then still rolls back). 0s in labs.")
    @click.option("--gate", "gates", multiple=True,
                  help="Extra gate, e.g. p95_latency_ms<50, error_rate<0.01, p95_ratio<1.2.")
    @click.option("--health-window", default=None, help="Override the agents' health window for this rollout.")
    @click.option("--wait", "wait", is_flag=True,
                  help="Follow the rollout to its end (wave table on every change); exit 10 if it is rolled back"
                       " or aborted.")
    @click.option("--timeout", default="30m", show_default=True, help="With --wait: give up (exit 10) after this long.")
    @click.option("--force", is_flag=True,
                  help="Start even when no selected device can run the artifact's target (a warning instead).")
    @profile_option
    @json_option
    @handle_errors
    def rollout_start_cmd(target, db, selector, waves, max_failure_rate, bake, gates, health_window, wait, timeout,
                          force, profile, as_json):
        """Roll NAME@VERSION out in waves (the running manager executes it)."""
        timing = apply_profile(profile, "rollout", {"bake": bake, "health_window": health_window})
        bake, health_window = timing["bake"], timing["health_window"]
        from edgeml.fleet.gates import parse_gate
        from edgeml.fleet.protocol import parse_labels
        from edgeml.fleet.service import CommandClient
        from edgeml.fleet.waves import parse_duration, parse_rate, parse_waves

        args = {"target": target, "selector": parse_labels(selector), "waves": parse_waves(waves),
                "max_failure_rate": parse_rate(max_failure_rate), "bake_s": parse_duration(bake), "gates": list(gates)}
        for g in gates:
            parse_gate(g)   # refuse a bad gate here, before queuing
        if health_window is not None:
            args["health_window_s"] = parse_duration(health_window)
        timeout_s = parse_duration(timeout)
        path = _db_path(db)
        check_published(path, target)
        for line in preflight(path, target, args["selector"], force, args["waves"]):
            click.echo(line, err=True)
        s = CommandClient(path).submit("rollout.start", args)
        if not wait:
            emit(s, as_json, status_text)
            return
        finish(follow(path, s["id"], timeout_s=timeout_s, echo=None if as_json else click.echo), as_json)

    @rollout_group.command("status", epilog=examples(
        "edgeml fleet rollout status", "edgeml fleet rollout status 3 --watch"))
    @click.argument("rollout_id", required=False)
    @_db_opts
    @click.option("--watch", "-w", is_flag=True,
                  help="Follow the rollout until it ends; exit 10 if it is rolled back or aborted.")
    @click.option("--timeout", default="30m", show_default=True, help="With --watch: give up (exit 10) after this long.")
    @json_option
    @handle_errors
    def rollout_status_cmd(rollout_id, db, watch, timeout, as_json):
        """Show one rollout (or list all). With --watch, exit 0 only once it completed."""
        from edgeml.errors import UsageError
        from edgeml.fleet.db import FleetDB
        from edgeml.fleet.manager import rollout_status
        from edgeml.fleet.waves import parse_duration

        path = _db_path(db)
        if watch:
            if not rollout_id:
                raise UsageError("--watch follows one rollout: give its ID", hint="list them: edgeml fleet rollout status")
            timeout_s = parse_duration(timeout)
            finish(follow(path, rollout_id, timeout_s=timeout_s, echo=None if as_json else click.echo), as_json)
            return
        fdb = FleetDB(path, readonly=True)
        if rollout_id:
            emit(rollout_status(fdb, rollout_id), as_json, status_text)
            return
        rows = [rollout_status(fdb, r["id"]) for r in fdb.q("SELECT id FROM rollouts ORDER BY CAST(id AS INTEGER)")]

        def human(rs: list[dict]) -> str:
            if not rs:
                return "no rollouts"
            out = [("ID", "TARGET", "STATE", "WAVE", "REASON")]
            out += [(s["id"], s["target"], s["state"], f"{min(s['wave'], len(s['waves']))}/{len(s['waves'])}",
                     s["reason"] or "") for s in rs]
            return "\n".join(table(out))

        emit(rows, as_json, human)

    def op(name: str, doc: str) -> None:
        @rollout_group.command(name, help=doc, epilog=examples(f"edgeml fleet rollout {name} 3"))
        @click.argument("rollout_id")
        @_db_opts
        @json_option
        @handle_errors
        def cmd(rollout_id, db, as_json):
            from edgeml.fleet.service import CommandClient

            emit(CommandClient(_db_path(db)).submit(f"rollout.{name}", {"id": rollout_id}), as_json, status_text)

    op("pause", "Stop advancing waves (in-flight installs finish).")
    op("resume", "Continue a paused rollout.")
    op("abort", "Stop the rollout; devices stay where they are.")
    op("rollback", "Return every device this rollout updated to its previous version.")


def _size(size: int) -> str:
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
