"""Fixtures for tests/textgen: the tiny trained decoder (cached by content hash) and its compiled artifact.

The tiny preset of ``edgeml.compiler.textgen_train`` trains in seconds on the standard library's source; the
cache (``EDGEML_CACHE`` or ~/.cache/edgeml) makes later runs skip training. The artifact is compiled once per
session through the real CLI (FP32, INT8 and INT4 candidates, real NNCF and OpenVINO).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="text generation needs openvino (pip install 'edgeml[compiler]')")
pytest.importorskip("nncf", reason="weight compression needs nncf (pip install 'edgeml[compiler]')")
pytest.importorskip("transformers", reason="the test decoder is built with transformers")
pytest.importorskip("tokenizers", reason="the tokenizer is trained with tokenizers")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    import torch

    from edgeml.compiler.textgen_train import trained_model

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        return trained_model("tiny")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> Path:
    from edgeml.runtime.signing import generate_keypair

    key = tmp_path_factory.mktemp("keys") / "dev.key"
    generate_keypair(key)
    return key


@pytest.fixture(scope="session")
def compiled(tiny_model_dir: Path, signing_key: Path, tmp_path_factory) -> tuple[Path, dict]:
    """(artifact path, the CLI's --json report) of the tiny decoder compiled with every candidate."""
    out = tmp_path_factory.mktemp("textgen") / "tiny.edgepkg"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeml.cli", "compile", str(tiny_model_dir), "--task", "text-generation",
         "-t", "x86_64", "-o", str(out), "--sign-key", str(signing_key), "--json", "-q"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)
