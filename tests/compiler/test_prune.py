"""--prune: torch-pruning channel pruning + fine-tune as compile candidates, judged like every candidate.

The dense model is the digits CNN (examples/digits/train.py's model, split and loop) trained for a few
epochs; every compile here is real: torch-pruning, the fine-tune, the ONNX export, ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgeml
from edgeml.cli import main
from edgeml.compiler import compile_with_report
from edgeml.errors import DataError, MissingDependency, UsageError

REPO = Path(__file__).resolve().parents[2]
DENSE_EPOCHS = 6

pytest.importorskip("torch", reason="pruning needs torch (the compiler extra)")
pytest.importorskip("torch_pruning", reason="pruning needs torch-pruning (the compiler extra)")
pytest.importorskip("sklearn", reason="the digits training split comes from scikit-learn")


def _digits_module():
    spec = importlib.util.spec_from_file_location("edgeml_digits_train_t", REPO / "examples" / "digits" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FACTORY = '''
import torch

def build():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dt", {train_py!r})
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    net = m.build_model()
    net.load_state_dict(torch.load({weights!r}))
    return net.eval()
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A dense digits CNN, its weights behind a factory module, and train / eval files."""
    import torch

    folder = tmp_path_factory.mktemp("prune")
    dt = _digits_module()
    dt.set_determinism()
    splits = dt.load_splits()
    net = dt.build_model()
    dt.train(net, *splits["train"], epochs=DENSE_EPOCHS)
    torch.save(net.state_dict(), folder / "weights.pt")
    (folder / "digits_factory_t.py").write_text(
        FACTORY.format(train_py=str(REPO / "examples" / "digits" / "train.py"), weights=str(folder / "weights.pt")))
    np.savez(folder / "train.npz", input=splits["train"][0], labels=splits["train"][1])
    np.savez(folder / "eval.npz", input=splits["eval"][0], labels=splits["eval"][1])
    return {"net": net, "folder": folder, "train": folder / "train.npz", "eval": folder / "eval.npz",
            "x_train": splits["train"][0], "y_train": splits["train"][1]}


def _compile(trained, out: Path, **options):
    return compile_with_report(trained["net"], target="x86_64-avx2", output=out, backend="onnxruntime",
                          precision="fp32", input_shape={"input": (1, 1, 8, 8)}, eval=trained["eval"],
                          use_cache=False, benchmark_seconds=0.6, **options)


def test_pruned_candidates_are_evaluated_benchmarked_and_selected_like_any(trained, tmp_path):
    out = tmp_path / "d.edgepkg"
    result = _compile(trained, out, prune="0.25,0.5", train=trained["train"], fine_tune_epochs=2)
    by_label = {c["label"]: c for c in result.candidates}
    assert set(by_label) == {"onnxruntime/fp32", "onnxruntime/fp32+pruned25", "onnxruntime/fp32+pruned50"}
    for ratio, label in ((0.25, "onnxruntime/fp32+pruned25"), (0.5, "onnxruntime/fp32+pruned50")):
        recipe = by_label[label]["pruning"]
        assert recipe["ratio"] == ratio and recipe["fine_tune_epochs"] == 2
        assert recipe["loss"] == "cross-entropy on labels" and recipe["train_samples"] == len(trained["y_train"])
        assert recipe["params_after"] < recipe["params_before"]  # channels really removed
        assert by_label[label]["accuracy"] is not None  # scored on the same eval split as the dense one
    assert "pruning" not in by_label["onnxruntime/fp32"]
    passed = [c for c in result.candidates if c["status"] in ("passed", "selected")]
    assert all(c["latency_ms"]["p50"] > 0 for c in passed)  # every passing candidate was timed
    chosen = result.selected
    assert chosen["latency_ms"]["p50"] == min(c["latency_ms"]["p50"] for c in passed)
    # the manifest records the recipe of the chosen model (None when the dense one won)
    assert result.manifest["pruning"] == chosen.get("pruning")
    x = np.load(trained["eval"])["input"][:4]
    outputs = edgeml.load(out).predict({"input": x})  # the artifact loads (self-test included) and runs
    assert next(iter(outputs.values())).shape == (4, 10)


def test_a_pruned_model_that_loses_accuracy_is_rejected_not_shipped(trained, tmp_path):
    result = _compile(trained, tmp_path / "r.edgepkg", prune=[0.9], train=trained["train"], fine_tune_epochs=0,
                      max_accuracy_drop=1.0)
    pruned = next(c for c in result.candidates if c["label"].endswith("+pruned90"))
    assert pruned["status"] == "rejected" and "drops" in pruned["reason"]
    assert result.selected["label"] == "onnxruntime/fp32"
    assert result.manifest["pruning"] is None


def test_custom_loss_through_the_python_api(trained, tmp_path):
    import torch

    calls = []

    def soft_target_loss(outputs, targets):
        calls.append(1)
        return torch.nn.functional.mse_loss(torch.softmax(outputs, 1), targets)

    onehot = np.eye(10, dtype=np.float32)[trained["y_train"]]
    np.savez(tmp_path / "train_targets.npz", input=trained["x_train"], targets=onehot)
    result = _compile(trained, tmp_path / "c.edgepkg", prune=[0.5], train=tmp_path / "train_targets.npz",
                      fine_tune_epochs=1, train_loss=soft_target_loss, benchmark=False)
    pruned = next(c for c in result.candidates if c["label"].endswith("+pruned50"))
    assert calls and pruned["pruning"]["loss"].endswith("soft_target_loss")


def test_cli_prunes_a_factory_model(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained["folder"])
    monkeypatch.syspath_prepend(str(trained["folder"]))
    out = tmp_path / "f.edgepkg"
    res = CliRunner().invoke(main, ["compile", "digits_factory_t:build", "-t", "x86_64-avx2", "-o", str(out),
                                    "--backend", "onnxruntime", "--precision", "fp32", "--input-shape",
                                    "input=1,1,8,8", "--eval", str(trained["eval"]), "--prune", "0.5",
                                    "--train", str(trained["train"]), "--fine-tune-epochs", "1", "--no-cache",
                                    "--benchmark-seconds", "0.5", "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    labels = [c["label"] for c in report["candidates"]]
    assert labels == ["onnxruntime/fp32", "onnxruntime/fp32+pruned50"]
    assert report["candidates"][1]["pruning"]["ratio"] == 0.5


@pytest.mark.parametrize("options, error, words", [
    ({"prune": "0.5"}, UsageError, "--prune needs training data"),
    ({"prune": "1.5", "train": "t.npz"}, UsageError, "at most 0.9"),
    ({"prune": "half", "train": "t.npz"}, UsageError, "is not a number"),
    ({"train": "t.npz"}, UsageError, "only used with --prune"),
    ({"prune": "0.5", "train": "missing.npz"}, DataError, "does not exist"),
])
def test_bad_pruning_options(trained, tmp_path, options, error, words):
    np.savez(tmp_path / "t.npz", input=trained["x_train"][:8], labels=trained["y_train"][:8])
    options = {k: (tmp_path / v if k == "train" else v) for k, v in options.items()}
    with pytest.raises(error, match=words):
        _compile(trained, tmp_path / "x.edgepkg", **options)
    assert not (tmp_path / "x.edgepkg").exists()


def test_prune_refuses_an_onnx_file(tmp_path):
    out = tmp_path / "o.edgepkg"
    res = CliRunner().invoke(main, ["compile", str(REPO / "examples" / "digits" / "digits.onnx"), "-t", "x86_64-avx2",
                                    "-o", str(out), "--prune", "0.5", "--train",
                                    str(REPO / "examples" / "digits" / "eval.npz")])
    assert res.exit_code == 2 and "--prune needs a PyTorch model" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_training_file_without_labels_names_the_fix(trained, tmp_path):
    np.savez(tmp_path / "nolabels.npz", input=trained["x_train"][:16])
    with pytest.raises(DataError, match="no 'labels' array"):
        _compile(trained, tmp_path / "n.edgepkg", prune="0.5", train=tmp_path / "nolabels.npz")


def test_missing_torch_pruning_names_the_extra(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # a real ImportError on import
    with pytest.raises(MissingDependency) as info:
        _compile(trained, tmp_path / "m.edgepkg", prune="0.5", train=trained["train"])
    assert "torch-pruning" in info.value.message and "edgeml[compiler]" in (info.value.hint or "")
