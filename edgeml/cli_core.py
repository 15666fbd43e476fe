"""Core commands: targets, keygen, inspect, run."""

from __future__ import annotations

from pathlib import Path

import click

from edgeml.cli import DurationType, check_output_file, check_trusted_keys, emit, examples, handle_errors, json_option
from edgeml.errors import UsageError


@click.command("targets", epilog=examples("edgeml targets", "edgeml targets --host --json"))
@click.option("--host", "host_only", is_flag=True, help="Only the targets this machine can execute.")
@json_option
@handle_errors
def targets_cmd(host_only: bool, as_json: bool) -> None:
    """List the shipped targets (and which ones this host executes)."""
    from edgeml.targets import all_targets, best_host_target, host_arch

    rows = []
    for t in all_targets().values():
        missing = t.missing_features()
        if host_only and missing:
            continue
        rows.append({**t.to_dict(), "runs_on_host": not missing, "missing_on_host": missing})
    if as_json:
        emit({"host_arch": host_arch(), "targets": rows}, True)
        return
    best = best_host_target().name
    for r in rows:
        mark = "*" if r["name"] == best else ("+" if r["runs_on_host"] else " ")
        why = "" if r["runs_on_host"] else f"  (host lacks: {', '.join(r['missing_on_host'])})"
        click.echo(f"{mark} {r['name']:<20} {r['description']}  [{', '.join(r['backends'])}]{why}")
    click.echo("\n* best target for this host, + runs on this host")


@click.command("keygen", epilog=examples(
    "edgeml keygen signing.key          # then: compile --sign-key signing.key; agents --trusted-key signing.key.pub"))
@click.argument("key", type=str)
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
@json_option
@handle_errors
def keygen_cmd(key: str, force: bool, as_json: bool) -> None:
    """Create an Ed25519 signing key KEY and its public half KEY.pub (the folder must exist)."""
    from edgeml.runtime.signing import generate_keypair, key_id_of, load_public_key

    # Both halves are checked before either is written, so a refusal leaves nothing behind.
    private_path = check_output_file(key, "KEY", overwrite=force)
    check_output_file(f"{private_path}.pub", "KEY.pub", overwrite=force)
    private, public = generate_keypair(private_path, overwrite=force)
    kid = key_id_of(load_public_key(public))
    emit({"private_key": str(private), "public_key": str(public), "key_id": kid}, as_json,
         lambda r: f"wrote {r['private_key']} (keep secret) and {r['public_key']} (key id {r['key_id']})")


@click.command("inspect", epilog=examples(
    "edgeml inspect digits.edgepkg", "edgeml inspect digits.edgepkg --trusted-key signing.key.pub",
    "edgeml inspect digits.edgepkg --json      # the whole manifest"))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--verify/--no-verify", default=True, help="Check every file hash (default) or only read the manifest.")
@click.option("--trusted-key", "trusted_keys", multiple=True, envvar="EDGEML_TRUSTED_KEYS", show_envvar=True,
              type=click.Path(path_type=Path), help="Check the signature against this public key.")
@json_option
@handle_errors
def inspect_cmd(artifact: Path, verify: bool, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Show an artifact's manifest (--json prints it whole)."""
    from edgeml.runtime.artifact import read_manifest, verify_zip

    check_trusted_keys(trusted_keys)
    if verify:
        manifest, _, signer, _ = verify_zip(artifact, trusted_keys=list(trusted_keys))
    else:
        manifest, signer = read_manifest(artifact), None
    if as_json:
        emit(manifest, True)
        return
    import zipfile

    with zipfile.ZipFile(artifact) as zf:
        has_signature = "manifest.sig" in zf.namelist()
    click.echo(_describe({**manifest, "signed": has_signature}, signer))


def _describe(m: dict, signer: str | None) -> str:
    from edgeml.cli_format import candidate_rows, key_values, num, table

    backend = m.get("backend") or {}
    pairs = [
        ("artifact", f"{m.get('name')} {m.get('version')}"),
        ("target", str(m.get("target"))),
        ("backend", f"{backend.get('name')} {backend.get('version', '')}".strip()),
        ("precision", str(m.get("precision"))),
        ("inputs", ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in m.get("inputs", []))),
        ("outputs", ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in m.get("outputs", []))),
    ]
    acc = m.get("accuracy") or {}
    if acc:
        verified = "" if acc.get("verified", True) else "  (UNVERIFIED on the compiling host)"
        pairs.append(("accuracy", f"{acc.get('metric')}: fp32 {num(acc.get('fp32'))}  compiled "
                                     f"{num(acc.get('compiled'))}  drop {num(acc.get('drop'))}"
                                     f" (max {num(acc.get('max_drop'))}){verified}"))
    if m.get("quantization"):
        q = m["quantization"]
        pairs.append(("quantization", key_values(q) if isinstance(q, dict) else str(q)))
    signature = (f"signed by {signer}" if signer else
                 "present (not checked: no trusted key given)" if m.get("signed") else "none")
    pairs.append(("signature", signature))
    lines = table(pairs)
    if m.get("candidates"):
        lines += ["", "candidates (> = selected):"] + candidate_rows(m["candidates"])
    return "\n".join(lines)


@click.command("run", epilog=examples(
    "edgeml run digits.edgepkg --input examples/digits/sample.npz",
    "edgeml run digits.edgepkg --input examples/digits/sample.npz -o outputs.npz",
    "edgeml run digits.edgepkg --input 'images/*.png' -o results/      # batch, resumable",
    "edgeml run digits.edgepkg --mqtt-in cam/frames --mqtt-out cam/classes --broker mqtt://127.0.0.1:1883"))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--input", "input_text", type=str,
              help="An .npz keyed by input name; or, for a batch job, a folder, a quoted glob ('data/*.npy') "
                   "or '-' (paths on stdin) of .npy/.npz/image items.")
@click.option("-o", "--output", "output_text", type=str,
              help="With one .npz input: write its outputs to this .npz. Batch job: the folder of <item>.npz.")
@click.option("--mqtt-in", "mqtt_in", type=str, help="Stream job: consume v2 inference requests from this topic.")
@click.option("--mqtt-out", "mqtt_out", type=str, help="Stream job: publish the responses on this topic.")
@click.option("--broker", type=str, help="Stream job: the MQTT broker, mqtt://HOST[:PORT].")
@click.option("--max-messages", type=click.IntRange(1, 1 << 40), default=None,
              help="Stream job: stop after this many messages (default: until SIGINT/SIGTERM).")
@click.option("--idle-timeout", "idle_timeout_s", type=DurationType("s"), default=None,
              help="Stream job: stop after this long without a message (30s, 5m; a bare number is seconds).")
@click.option("--trusted-key", "trusted_keys", multiple=True, envvar="EDGEML_TRUSTED_KEYS", show_envvar=True,
              type=click.Path(path_type=Path),
              help="Refuse the artifact unless signed by this public key (repeatable).")
@json_option
@handle_errors
def run_cmd(artifact: Path, input_text: str | None, output_text: str | None, mqtt_in: str | None,
            mqtt_out: str | None, broker: str | None, max_messages: int | None, idle_timeout_s: float | None,
            trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    """Run ARTIFACT on one .npz (--input X.npz [--output Y.npz]), a batch of items (--input DIR|GLOB|- --output
    DIR: resumable, one .npz per item), or an MQTT stream (--mqtt-in/--mqtt-out/--broker)."""
    check_trusted_keys(trusted_keys)
    if idle_timeout_s is not None and not 0.001 <= idle_timeout_s <= 86_400 * 365:
        raise UsageError(f"--idle-timeout {idle_timeout_s:g}s is outside 1ms..365 days")
    stream = (mqtt_in, mqtt_out, broker)
    if any(v is not None for v in stream):
        if not all(stream) or input_text is not None:
            raise UsageError("a stream job needs --mqtt-in, --mqtt-out and --broker together, and no --input")
        return _run_stream(artifact, mqtt_in, mqtt_out, broker, max_messages, idle_timeout_s,  # type: ignore[arg-type]
                           trusted_keys, as_json)
    if input_text is None:
        raise UsageError("give --input (an .npz, a folder, a glob or '-') or a stream (--mqtt-in ...)")
    if input_text != "-" and not any(ch in input_text for ch in "*?[") and not Path(input_text).exists():
        from edgeml.errors import DataError

        raise DataError(f"--input {input_text} does not exist",
                        hint="give an .npz keyed by input name, a folder of items, a quoted glob or '-'")
    if input_text.endswith(".npz") and Path(input_text).is_file():     # the one-file form, unchanged
        return _run_one(artifact, Path(input_text), output_text, trusted_keys, as_json)
    return _run_batch(artifact, input_text, output_text, trusted_keys, as_json)


def _run_batch(artifact: Path, input_text: str, output_text: str | None, trusted_keys: tuple[Path, ...],
               as_json: bool) -> None:
    import edgeml
    from edgeml.runtime.jobs import list_items, prepare_output_dir, run_batch

    if output_text is None:
        raise UsageError("a batch job needs --output DIR (one .npz per item is written there)")
    items = list_items(input_text)          # refuse a bad --input before creating anything
    out_dir = prepare_output_dir(output_text, input_text)
    model = edgeml.load(artifact, trusted_keys=list(trusted_keys))

    def progress(i: int, n: int, item: str, status: str) -> None:
        click.echo(f"[{i}/{n}] {status} {item}", err=True)

    try:
        summary = run_batch(model, items, out_dir, progress)
    finally:
        model.close()
    result = {**summary.to_dict(), "output": str(out_dir)}
    emit(result, as_json, lambda r: f"{r['done']} done, {r['skipped']} skipped (already done), {r['failed']} failed "
         f"of {r['total']} in {r['seconds']} s -> {r['output']}" + "".join(
             f"\n  failed: {f['item']}: {f['error']}" for f in r["failures"]))
    if summary.failed:
        raise click.exceptions.Exit(1)


def _run_stream(artifact: Path, topic_in: str, topic_out: str, broker: str, max_messages: int | None,
                idle_timeout_s: float | None, trusted_keys: tuple[Path, ...], as_json: bool) -> None:
    import signal
    import threading

    import edgeml
    from edgeml.runtime.stream import StreamConfig, run_stream

    cfg = StreamConfig(broker, topic_in, topic_out, max_messages=max_messages, idle_timeout_s=idle_timeout_s)
    cfg.check()
    model = edgeml.load(artifact, trusted_keys=list(trusted_keys))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    def ready() -> None:
        click.echo(f"consuming {topic_in} on {broker}, publishing to {topic_out}", err=True)

    try:
        stats = run_stream(model, cfg, stop, on_ready=ready)
    finally:
        model.close()
    emit(stats, as_json, lambda r: f"{r['messages']} messages: {r['requests'] - r['failures'] - r['rejected']} "
         f"answered, {r['rejected']} rejected (bad input), {r['failures']} failed")


def _run_one(artifact: Path, input_path: Path, output_text: str | None, trusted_keys: tuple[Path, ...],
             as_json: bool) -> None:
    import numpy as np

    import edgeml
    from edgeml.cli_format import top_classes
    from edgeml.compiler_data import load_npz_inputs
    from edgeml.runtime.fsutil import atomic_path

    # refuse a bad --output before any work, not after it
    output_path = None if output_text is None else check_output_file(output_text, "--output")
    model = edgeml.load(artifact, trusted_keys=list(trusted_keys))
    feeds = _cast_feeds(load_npz_inputs(input_path, [s.name for s in model.inputs]), model, input_path)
    outputs = model.predict(feeds)
    if output_path:
        try:
            with atomic_path(output_path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **outputs)
        except OSError as exc:  # e.g. disk full: the temp file is gone, the target untouched
            raise UsageError(f"--output: cannot write {output_path}: {exc.strerror or exc}") from None
    summary = {name: {"shape": list(v.shape), "dtype": str(v.dtype)} for name, v in outputs.items()}
    if as_json:
        emit({"outputs": summary, "output_file": str(output_path) if output_path else None,
              "values": None if output_path else {k: v.tolist() for k, v in outputs.items()}}, True)
    else:
        classifier = _is_classifier(model)
        for name, v in outputs.items():
            click.echo(f"{name}: shape={list(v.shape)} dtype={v.dtype}")
            tops = top_classes(name, v) if classifier and v.ndim == 2 else []
            if tops:
                click.echo("\n".join(tops[1:]))
            elif not output_path:
                click.echo(np.array2string(v, threshold=50, precision=4, suppress_small=True))
        if output_path:
            click.echo(f"wrote {output_path}")


def _is_classifier(model) -> bool:
    """Class scores: the artifact was checked with a class metric (top1 / argmax agreement)."""
    manifest = getattr(model, "manifest", None)
    acc = (manifest.get("accuracy") if isinstance(manifest, dict) else getattr(manifest, "accuracy", None)) or {}
    metric = acc.get("metric") if isinstance(acc, dict) else getattr(acc, "metric", None)
    return metric in ("top1", "fp32_agreement", "agreement")


def _cast_feeds(feeds: dict, model, input_path: Path) -> dict:
    """Cast each array to its input's dtype; an array that cannot be (strings, objects) is a DataError."""
    from edgeml.runtime.jobs import cast_feeds

    return cast_feeds(feeds, model, input_path)
