"""Fixtures for tests/compiler: the shipped digits example and tiny ONNX graphs built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compile_helpers import mlp_model

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "examples" / "digits"


@pytest.fixture(scope="session")
def digits() -> dict[str, Path]:
    files = {k: DIGITS / f"{k}.npz" for k in ("calib", "eval", "sample")}
    files["model"] = DIGITS / "digits.onnx"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"the shipped digits example is missing {missing}; run python examples/digits/train.py")
    return files


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_model().SerializeToString())
    return path


@pytest.fixture
def mlp_data(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:48])
    np.savez(tmp_path / "eval.npz", x=x[48:])
    return {"calib": tmp_path / "calib.npz", "eval": tmp_path / "eval.npz", "x": x}
