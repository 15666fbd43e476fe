"""Shared fixtures for tests/runtime: tiny real ONNX models packed as real .edgepkg artifacts.

No compiler needed: the ONNX graphs are built with onnx.helper (see serve_models.py) and
written with ``edgeml.runtime.artifact.write_artifact``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from serve_models import MLP_INPUTS, MLP_OUTPUTS, gather_onnx, mlp_onnx, write_onnx_artifact


@pytest.fixture
def make_mlp_artifact(tmp_path: Path) -> Callable[..., Path]:
    """``make_mlp_artifact(name="mlp", version="1", scale=1.0) -> Path`` of a 30-feature MLP .edgepkg."""

    def make(name: str = "mlp", version: str = "1", scale: float = 1.0, sign_key: Path | None = None) -> Path:
        return write_onnx_artifact(tmp_path / f"{name}-{version}.edgepkg", mlp_onnx(scale=scale), name=name,
                                   version=version, inputs=MLP_INPUTS, outputs=MLP_OUTPUTS, sign_key=sign_key)

    return make


@pytest.fixture
def make_gather_artifact(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "gather", version: str = "1") -> Path:
        return write_onnx_artifact(
            tmp_path / f"{name}-{version}.edgepkg", gather_onnx(), name=name, version=version,
            inputs=[{"name": "idx", "dtype": "int64", "shape": [None, 1]}],
            outputs=[{"name": "y", "dtype": "float32", "shape": [None, 1, 3]}])

    return make


@pytest.fixture
def artifact_cache(tmp_path: Path) -> Path:
    """A private extraction cache so tests never touch ~/.cache."""
    return tmp_path / "cache"
