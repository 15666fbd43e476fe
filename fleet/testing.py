"""Tiny real artifacts for fleet tests and the demo (needs the ``onnx`` package).

``make_artifact(out, name, version, kind=...)`` builds a 4->3 ONNX MatMul+Add
model, runs it with ONNX Runtime for the golden outputs and writes a signed
``.edgepkg``. ``kind="bad_golden"`` stores wrong golden outputs (self-test
fails); ``kind="slow"`` sets a latency budget no model meets; ``kind="bad_lookup"``
adds a lookup into a one-entry table indexed by "any input equals 1.0": the
self-test and warm-up pass, a request holding 1.0 fails at run time (index out
of range), as a model with a too-short embedding table fails on an unseen value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _model_bytes(seed: int, bad_lookup: bool = False) -> bytes:
    from edgeml.errors import require

    require("onnx", "compiler", feature="building test artifacts")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "B"], ["y0" if bad_lookup else "y"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if bad_lookup:       # y = y0 + table[max(x == 1.0)]; the table has one entry, so index 1 is out of range
        nodes += [helper.make_node("Equal", ["x", "one"], ["hit"]),
                  helper.make_node("Cast", ["hit"], ["hit_i"], to=TensorProto.INT64),
                  helper.make_node("ReduceMax", ["hit_i"], ["idx"], keepdims=0),
                  helper.make_node("Gather", ["table", "idx"], ["extra"]),
                  helper.make_node("Add", ["y0", "extra"], ["y"])]
        inits += [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                  numpy_helper.from_array(np.zeros(1, np.float32), "table")]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_artifact(out: Path, name: str = "tiny", version: str = "1.0.0", *, kind: str = "good",
                  sign_key: Path | None = None, seed: int | None = None) -> Path:
    import onnxruntime as ort

    from edgeml.runtime.artifact import golden_npz_bytes, write_artifact

    seed = seed if seed is not None else sum(map(ord, version))
    model = _model_bytes(seed, bad_lookup=kind == "bad_lookup")
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    if kind == "bad_golden":
        y = y + 1.0
    manifest = {
        "schema_version": 1, "name": name, "version": version, "target": "x86_64", "arch": "x86_64",
        "required_features": [],
        "backend": {"name": "onnxruntime", "version": ort.__version__, "entrypoint": "model/model.onnx",
                    "options": {"graph_optimization_level": "all"}},
        "precision": "fp32",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}],
        "selftest": {"file": "selftest/golden.npz", "rtol": 1e-3, "atol": 1e-4,
                     "latency_budget_ms": 0.000001 if kind == "slow" else 50},
        "runtime": {"threads": 1},
    }
    files = {"model/model.onnx": model, "selftest/golden.npz": golden_npz_bytes({"x": x}, {"y": y})}
    return write_artifact(Path(out), manifest, files, sign_key=sign_key)


def wait_until(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll ``cond`` until it returns something truthy; AssertionError naming ``what`` after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_journal(state_dir: Path) -> dict:
    import json

    return json.loads((Path(state_dir) / "journal.json").read_text())


def make_test_pki(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throwaway CA, a server certificate for ``host`` and a client certificate (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, name):
        p = folder / name
        p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        p.chmod(0o600)
        return p

    def cert(subject_cn, key, issuer_name, issuer_key, *, ca=False, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeml test CA")])
    ca_cert = cert("edgeml test CA", ca_key, ca_name, ca_key, ca=True)
    out = {"ca": folder / "ca.pem"}
    out["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role, san in (("server", [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
                      ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(f"edgeml {role}", key, ca_name, ca_key, san=san)
        out[f"{role}_cert"] = folder / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = write_key(key, f"{role}.key")
    return out
