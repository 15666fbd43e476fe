"""The probes behind scripts/fault_table.py: each returns Observed rows (input, expected, actual, ok).

Every probe is bounded: socket timeouts, subprocess timeouts, fixed counts. Nothing here asserts; the
verdict of each row is computed from what was observed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

PY = sys.executable
CLI = [PY, "-m", "edgeml.cli"]
W = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float32) / 10   # the probe model: y = x @ W


@dataclass
class Observed:
    input: str
    expected: str
    actual: str
    ok: bool


# ---------------------------------------------------------------------------------------------- helpers

def cli(args: list[str], *, timeout: float = 60, env: dict | None = None, cwd: Path | None = None
        ) -> tuple[int, str, str, float, int]:
    """Run ``edgeml ARGS``; returns (exit code, stdout, stderr, seconds, this child's peak RSS MiB).

    Exit code 124 = killed at ``timeout``. The child is reaped with wait4 so its own peak RSS is known.
    """
    import threading

    start = time.monotonic()
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    sinks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: sinks.__setitem__(k, f.read()), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    code, rss = 124, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code, rss = os.waitstatus_to_exitcode(status), int(usage.ru_maxrss / 1024)
            break
        if time.monotonic() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = code
    for r in readers:
        r.join(5)
    text = {k: v.decode(errors="replace") for k, v in sinks.items()}
    return code, text.get("out", ""), text.get("err", ""), time.monotonic() - start, rss


def first_error(err: str) -> str:
    if "Traceback" in err:
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
        return f"TRACEBACK {last[:120]}"
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Error:"))]
    return (lines[0] if lines else err.strip().splitlines()[0] if err.strip() else "(no message)")[:160]


def clean_refusal(name: str, args: list[str], expect_code: int | None, *, word: str = "",
                  timeout: float = 60, env: dict | None = None, cwd: Path | None = None,
                  max_rss_mib: int | None = None, expected: str | None = None) -> Observed:
    """A CLI call that must end in one clear error (exit code, no traceback, ``word`` in the message)."""
    code, _, err, secs, rss = cli(args, timeout=timeout, env=env, cwd=cwd)
    msg = first_error(err)
    ok = (code != 0 and code != 124 and "Traceback" not in err and (expect_code is None or code == expect_code)
          and word.lower() in err.lower() and (max_rss_mib is None or rss <= max_rss_mib))
    rss_text = f", peak RSS {rss} MiB" if max_rss_mib is not None else ""
    want = expected or f"exit {expect_code if expect_code is not None else '!=0'}, one error naming '{word}'"
    return Observed(name, want, f"exit {code} in {secs:.1f}s{rss_text}: {msg}", ok)


# ---------------------------------------------------------------------------------------------- artifacts

def probe_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def base_manifest() -> dict[str, Any]:
    import onnxruntime

    return {"schema_version": 1, "name": "probe", "version": "1", "target": "x86_64", "arch": "x86_64",
            "required_features": [], "precision": "fp32", "runtime": {"threads": 1},
            "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                        "options": {}},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}]}


def good_artifact(folder: Path) -> Path:
    from edgeml.runtime.artifact import write_artifact

    return write_artifact(folder / "good.edgepkg", base_manifest(), {"model/model.onnx": probe_onnx()})


def entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def craft(path: Path, manifest: Any, members: list[tuple[str, bytes]], *, raw_manifest: bytes | None = None,
          sig: bytes | None = None) -> Path:
    """Write a zip exactly as an attacker would (no validation, names as given)."""
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")
        zf.writestr("manifest.json", raw_manifest if raw_manifest is not None else json.dumps(manifest))
        if sig is not None:
            zf.writestr("manifest.sig", sig)
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return path


def _valid_parts() -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    model = probe_onnx()
    manifest = base_manifest()
    manifest["files"] = {"model/model.onnx": entry(model)}
    return manifest, [("model/model.onnx", model)]


def _zero_bomb(path: Path, size: int) -> Path:
    """A listed all-zero member of ``size`` bytes (right hash and size), deflated to ~1/1000."""
    manifest, members = _valid_parts()
    digest = hashlib.sha256()
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        digest.update(chunk)
    manifest["files"]["model/zeros.bin"] = {"sha256": digest.hexdigest(), "size": size}
    craft(path, manifest, members)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("model/zeros.bin", "w", force_zip64=True) as fh:
        for _ in range(size >> 20):
            fh.write(chunk)
    return path


def _many_members(path: Path, count: int) -> Path:
    manifest, members = _valid_parts()
    members += [(f"m/{i}", b"") for i in range(count)]
    manifest["files"].update({f"m/{i}": entry(b"") for i in range(count)})
    return craft(path, manifest, members)


def _mutated(path: Path, mutate: Callable[[dict, list], None]) -> Path:
    manifest, members = _valid_parts()
    mutate(manifest, members)
    return craft(path, manifest, members)


def _alias(name: str) -> Callable[[dict, list], None]:
    def mutate(manifest: dict, members: list) -> None:
        members.append((name, b"unverified twin"))
        manifest["files"][name] = entry(b"unverified twin")
    return mutate


def artifact_rows(work: Path) -> list[Observed]:
    env = {"XDG_CACHE_HOME": str(work / "cache")}
    rows: list[Observed] = []

    def refused(label: str, path: Path, word: str, *, args: tuple[str, ...] = (), rss: int = 400,
                extra_env: dict | None = None) -> None:
        rows.append(clean_refusal(label, ["inspect", str(path), *args], 7, word=word, env={**env, **(extra_env or {})},
                                  timeout=60, max_rss_mib=rss))

    ep = lambda v: (lambda m, _: m["backend"].__setitem__("entrypoint", v))  # noqa: E731
    refused("member name `../evil` (traversal)", _mutated(work / "trav.edgepkg", _alias("../evil")), "../evil")
    refused("member name `/abs/evil`", _mutated(work / "abs.edgepkg", _alias("/abs/evil")), "/abs/evil")
    for i, name in enumerate(["model/model.onnx/.", "model/./model.onnx", "model//model.onnx"]):
        refused(f"alias member `{name}` beside model/model.onnx", _mutated(work / f"alias{i}.edgepkg", _alias(name)),
                name)
    refused("entrypoint `../outside.so`", _mutated(work / "ep1.edgepkg", ep("../outside.so")), "entrypoint")
    refused("entrypoint `/etc/passwd`", _mutated(work / "ep2.edgepkg", ep("/etc/passwd")), "entrypoint")
    refused("entrypoint not listed in files", _mutated(work / "ep3.edgepkg", ep("model/other.onnx")), "entrypoint")
    refused("runtime.threads 100000", _mutated(work / "thr.edgepkg", lambda m, _: m["runtime"].__setitem__(
        "threads", 100000)), "threads")
    def set_field(field: str, value: Any) -> Callable[[dict, list], None]:
        return lambda m, _: m.__setitem__(field, value)

    fields: list[tuple[str, Any]] = [("required_features", "sse4_2"), ("files", {"model/model.onnx": "abc"}),
                         ("inputs", [{"name": "x", "dtype": "float32", "shape": "abc"}]),
                         ("inputs", [{"name": "x", "dtype": "float99", "shape": [None, 4]}]), ("name", 42)]
    for field, value in fields:
        refused(f"manifest `{field}`: {json.dumps(value)[:40]}",
                _mutated(work / f"f{len(rows)}.edgepkg", set_field(field, value)), field)
    _, members = _valid_parts()
    for raw in (b"null", b"42", b"[" * 30000 + b"]" * 30000):
        refused(f"manifest.json = `{raw[:12].decode()}`{'...' if len(raw) > 12 else ''}",
                craft(work / f"raw{len(rows)}.edgepkg", None, members, raw_manifest=raw), "manifest")
    manifest, members = _valid_parts()
    for sig in (b"not json", b"[1, 2]"):
        refused(f"manifest.sig = `{sig.decode()}`", craft(work / f"sig{len(rows)}.edgepkg", manifest, members, sig=sig),
                "sig")
    start = time.monotonic()
    many = _many_members(work / "many.edgepkg", 50_000)
    rows.append(clean_refusal(f"50,000 members (built in {time.monotonic() - start:.1f}s)",
                              ["inspect", str(many)], 7, word="", env=env, timeout=30, max_rss_mib=400,
                              expected="refused (exit 7) in seconds, peak RSS <= 400 MiB"))
    bomb = _zero_bomb(work / "bomb.edgepkg", 1 << 30)
    code, _, err, secs, rss = cli(["inspect", str(bomb)], env=env, timeout=60)
    rows.append(Observed(f"listed 1 GiB zero member in a {bomb.stat().st_size >> 10} KiB file",
                         "verified by streaming or refused; peak RSS <= 400 MiB, no traceback",
                         f"exit {code} in {secs:.1f}s, peak RSS {rss} MiB: {first_error(err) if code else 'accepted'}",
                         code != 124 and "Traceback" not in err and rss <= 400))
    rows.append(clean_refusal("the same 1 GiB member with EDGEML_MAX_ARTIFACT_BYTES=256 MiB", ["inspect", str(bomb)],
                              7, word="", env={**env, "EDGEML_MAX_ARTIFACT_BYTES": str(256 << 20)}, timeout=60,
                              max_rss_mib=400, expected="refused (exit 7): over the size cap"))
    return rows


# ---------------------------------------------------------------------------------------------- fleet protocol

def protocol_rows(work: Path) -> list[Observed]:
    from edgeml.errors import MessageRejected
    from edgeml.fleet import protocol

    topic = f"{protocol.PREFIX}/devices/dev-1/telemetry"
    active = {"name": "m", "version": "1", "seq": 1, "deployment_id": "d", "sha256": "ab" * 32}
    model = {"name": "m", "version": "1", "requests": 1, "failures": 0, "latency_buckets_ms": {"1": 1},
             "latency_sum_ms": 1.0}
    good = {"schema_version": protocol.SCHEMA_VERSION, "type": "telemetry", "device_id": "dev-1", "ts": 1.0,
            "interval_s": 5, "active": active, "models": [model]}

    def with_model(**changes: Any) -> bytes:
        return json.dumps({**good, "models": [{**model, **changes}]}).encode()

    cases: list[tuple[str, bytes, bool]] = [
        ("valid telemetry (control)", json.dumps(good).encode(), True),
        ("30,000-deep JSON array", b"[" * 30000 + b"]" * 30000, False),
        ("10,000-deep JSON object", b'{"a":' * 10000 + b"1" + b"}" * 10000, False),
        ('latency_buckets_ms {"1": "x"}', with_model(latency_buckets_ms={"1": "x"}), False),
        ("latency bucket -5", with_model(latency_buckets_ms={"1": -5}), False),
        ("requests 2^70", with_model(requests=2 ** 70), False),
        ("requests true", with_model(requests=True), False),
        ("latency_sum_ms NaN", with_model(latency_sum_ms=1.0).replace(b"1.0}", b"NaN}"), False),
        ("ts Infinity", json.dumps(good).encode().replace(b'"ts": 1.0', b'"ts": Infinity'), False),
        ("65 KiB message", json.dumps({**good, "pad": "x" * 66_000}).encode(), False),
        ("not UTF-8", b"\xff\xfe{}", False),
        ("device_id differs from topic", json.dumps({**good, "device_id": "dev-2"}).encode(), False),
        ("unknown field", json.dumps({**good, "extra": 1}).encode(), False),
    ]
    rows = []
    for label, payload, accept in cases:
        start = time.monotonic()
        try:
            protocol.validate(topic, payload)
            actual, ok = "accepted", accept
        except MessageRejected as exc:
            actual, ok = f"MessageRejected: {str(exc)[:110]}", not accept
        except Exception as exc:  # noqa: BLE001 - what the table exists to catch
            actual, ok = f"CRASH {type(exc).__name__}: {str(exc)[:80]}", False
        actual += f" ({(time.monotonic() - start) * 1000:.0f} ms)"
        rows.append(Observed(label, "accepted" if accept else "MessageRejected naming the problem", actual, ok))
    return rows


# ---------------------------------------------------------------------------------------------- CLI

def cli_rows(work: Path) -> list[Observed]:
    env = {"XDG_CACHE_HOME": str(work / "cache")}
    artifact = good_artifact(work)
    inputs = work / "in.npz"
    np.savez(inputs, x=np.ones((2, 4), np.float32))
    (work / "existing.key").write_text("keep")
    garbage = work / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 50)
    null_manifest = craft(work / "null.edgepkg", None, [], raw_manifest=b"null")
    rows = [
        clean_refusal("run --output /proc/version", ["run", str(artifact), "--input", str(inputs), "--output",
                                                     "/proc/version"], 2, word="--output", env=env),
        clean_refusal("run --output <a folder>", ["run", str(artifact), "--input", str(inputs), "--output",
                                                  str(work)], 2, word="--output", env=env),
        clean_refusal("keygen ''", ["keygen", ""], 2, word="KEY", cwd=work),
        clean_refusal("keygen into a missing folder", ["keygen", str(work / "no" / "k")], 2, word="does not exist"),
        clean_refusal("keygen over an existing key (no --force)", ["keygen", str(work / "existing.key")], 2,
                      word="--force"),
        clean_refusal("serve --port 99999", ["serve", str(artifact), "--port", "99999"], 2, word="port", env=env,
                      timeout=20),
        clean_refusal("serve --max-body-mb -1", ["serve", str(artifact), "--max-body-mb", "-1"], 2,
                      word="max-body", env=env, timeout=20),
        clean_refusal("fleet publish of a null manifest", ["fleet", "publish", str(null_manifest), "--db",
                                                           str(work / "f.db"), "--store", str(work / "store")],
                      None, word="manifest", env=env),
        clean_refusal("fleet devices --db <garbage file>", ["fleet", "devices", "--db", str(garbage)], None,
                      word=garbage.name, env=env),
        clean_refusal("agent --trusted-key <missing file>", ["agent", "--device-id", "d1", "--broker",
                                                             "mqtt://127.0.0.1:1", "--state-dir", str(work / "st"), "--trusted-key",
                                                             str(work / "missing.pub")], None, word="missing.pub",
                      env=env, timeout=10),
        clean_refusal("agent --heartbeat 0s", ["agent", "--device-id", "d1", "--broker", "mqtt://127.0.0.1:1",
                                               "--state-dir", str(work / "st"), "--allow-unsigned", "--heartbeat", "0s"], None, word="heartbeat", env=env, timeout=10),
    ]
    created = (work / "no").exists()
    rows.append(Observed("keygen into a missing folder: folder left alone", "folder not created",
                         "created" if created else "not created", not created))
    return rows


# ---------------------------------------------------------------------------------------------- server

def server_rows(work: Path) -> list[Observed]:
    from server_probes import ServerUnderTest, server_cases

    with ServerUnderTest(good_artifact(work), work) as srv:
        rows = server_cases(srv, W)
        rows.append(srv.final_check())
    return rows
