"""Builders for hostile artifacts: ZIPs written member by member, bypassing write_artifact's checks."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx() -> bytes:
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def base_manifest(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "schema_version": 1, "name": "tiny", "version": "1.0.0", "target": "x86_64", "arch": "x86_64",
        "required_features": [], "precision": "fp32",
        "backend": {"name": "onnxruntime", "version": "", "entrypoint": "model/model.onnx", "options": {}},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}]}
    m.update(over)
    return m


def listing(members: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in members.items()}


def craft(out: Path, manifest: Any, members: dict[str, bytes], *, sign_key: Path | None = None,
          raw_manifest: bytes | None = None, extra: tuple[tuple[zipfile.ZipInfo | str, bytes], ...] = ()) -> Path:
    """A ZIP with ``manifest`` (as given: nothing validated), optionally signed, then ``members``."""
    from edgeml.runtime import signing

    raw = raw_manifest if raw_manifest is not None else json.dumps(manifest, sort_keys=True).encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", raw)
        if sign_key is not None:
            zf.writestr("manifest.sig", json.dumps(signing.sign_bytes(raw, sign_key)))
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return out
