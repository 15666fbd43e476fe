"""``edgeml bench`` on a transformer encoder (bert-tiny from benchmarks/encoder.py): sequence lengths, token inputs,
``--input-shape`` / ``--data``, tokens/s. Real ONNX Runtime, the real click entry point, short durations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeml.cli import main

FAST = ["--duration", "100ms", "--min-queries", "5", "--repeats", "2", "--warmup", "20ms", "--no-sweep"]
SEQ = ["--input-shape", "input_ids=2,32", "--input-shape", "attention_mask=2,32"]
VOCAB = 1024  # bert-tiny's vocab_size


def _invoke(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def bert_tiny(tmp_path_factory) -> Path:
    pytest.importorskip("transformers", reason="the encoder is built from a transformers BertConfig")
    from edgeml.benchmarks import encoder

    return encoder.export_onnx("bert-tiny", tmp_path_factory.mktemp("enc") / "bert-tiny.onnx")


@pytest.fixture(scope="module")
def bert_tiny_pkg(bert_tiny, tmp_path_factory) -> Path:
    """The exported encoder wrapped as an ONNX Runtime artifact (the real writer; no compile, to stay fast)."""
    import onnxruntime

    from edgeml.runtime.artifact import write_artifact
    from edgeml.targets import get_target

    target = get_target("x86_64")
    dyn = [None, None]
    manifest = {
        "name": "bert-tiny", "version": "1.0.0", "target": target.name,
        "required_features": list(target.required_features), "arch": target.arch, "precision": "fp32",
        "backend": {"name": "onnxruntime", "version": onnxruntime.__version__, "entrypoint": "model/model.onnx",
                    "options": {}},
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": dyn},
                   {"name": "attention_mask", "dtype": "int64", "shape": dyn}],
        "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": [None, 64]}],
    }
    return write_artifact(tmp_path_factory.mktemp("enc_pkg") / "bert-tiny.edgepkg", manifest,
                          {"model/model.onnx": bert_tiny})


def test_a_dynamic_sequence_axis_without_a_value_is_one_clear_error(bert_tiny):
    res = _invoke(bert_tiny, *FAST, "--json")
    assert res.exit_code == 2, res.output
    err = json.loads(res.stdout)
    assert "input 'input_ids' has a dynamic axis 1" in err["message"]
    assert "--input-shape input_ids=" in err["hint"] and "--data" in err["hint"]
    assert "Traceback" not in res.output


def test_input_shape_sets_the_sequence_length_and_the_result_reports_tokens_per_s(bert_tiny, tmp_path):
    res = _invoke(bert_tiny, *FAST, *SEQ, "--scenario", "offline", "--report", tmp_path / "r", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["settings"]["input_shapes"] == {"input_ids": [2, 32], "attention_mask": [2, 32]}
    assert r["metrics"]["batch"] == 2  # axis 0 of --input-shape set the batch (--batch left at 1)
    used = r["inputs_used"]
    assert used["input_ids"]["shape"] == [2, 32] and used["attention_mask"]["shape"] == [2, 32]
    assert used["input_ids"]["source"] == f"random token ids in [0, {VOCAB})" and used["attention_mask"]["source"] == "ones"
    m = r["metrics"]
    assert m["sequence_length"] == 32 and m["tokens_per_s"] == pytest.approx(m["samples_per_s"] * 32)
    assert r["spread"]["tokens_per_s"]["n"] == 2
    md = (tmp_path / "r/report.md").read_text()
    assert "Tokens/s (samples/s x sequence length 32" in md and "| input_ids | 2x32 | int64 |" in md
    human = _invoke(bert_tiny, *FAST, *SEQ)
    assert human.exit_code == 0 and "tokens/s at sequence length 32" in human.stdout


def test_token_inputs_are_generated_within_the_vocabulary_of_the_onnx_model_and_the_artifact(bert_tiny, bert_tiny_pkg):
    from edgeml.benchmarks.sut import open_target

    shapes = {"input_ids": (1, 128), "attention_mask": (1, 128)}
    for path in (bert_tiny, bert_tiny_pkg):
        target = open_target(path, input_shapes=shapes)
        try:
            feeds = target.make_feeds(16, np.random.default_rng(0), count=8)
        finally:
            target.close()
        assert target.vocab == VOCAB, path  # read from the embedding table the ids index
        ids = np.stack([f["input_ids"] for f in feeds])
        assert ids.shape == (8, 16, 128) and ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < VOCAB and ids.max() >= 10  # the whole range, not the old [0, 10)
        assert all((f["attention_mask"] == 1).all() for f in feeds)


def test_data_npz_feeds_real_samples_and_sets_the_shape(bert_tiny, tmp_path):
    from edgeml.benchmarks import encoder
    from edgeml.benchmarks.sut import open_target

    tokens = encoder.tokens("bert-tiny", 5, 24)
    np.savez(tmp_path / "tok.npz", **tokens)
    res = _invoke(bert_tiny, *FAST, "--data", tmp_path / "tok.npz", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["inputs_used"]["input_ids"]["shape"] == [1, 24]
    assert r["inputs_used"]["input_ids"]["source"].startswith("data ")
    assert r["metrics"]["sequence_length"] == 24 and r["settings"]["data"] == str(tmp_path / "tok.npz")
    target = open_target(bert_tiny, data=tmp_path / "tok.npz")
    try:
        feeds = target.make_feeds(2, np.random.default_rng(3))
    finally:
        target.close()
    rows = {tuple(row) for row in tokens["input_ids"]}
    assert all(tuple(row) in rows for f in feeds for row in f["input_ids"])  # every fed sample is a real one


def test_bad_shapes_and_data_are_clean_errors(bert_tiny, tmp_path):
    cases = []
    np.savez(tmp_path / "partial.npz", input_ids=np.ones((4, 8), np.int64))
    cases.append((["--data", tmp_path / "partial.npz"], "the model's inputs are ['attention_mask', 'input_ids']"))
    np.savez(tmp_path / "float.npz", input_ids=np.ones((4, 8)), attention_mask=np.ones((4, 8), np.int64))
    cases.append((["--data", tmp_path / "float.npz"], "array 'input_ids' is float64; the model expects int64"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases.append((["--data", tmp_path / "junk.npz"], "is not a readable .npz"))
    cases.append((["--input-shape", "token=1,8"], "--input-shape names 'token', which is not an input"))
    cases.append((["--input-shape", "input_ids=1,8,2"], "does not fit the model's [?, ?]"))
    cases.append((["--input-shape", "input_ids=1,x"], "non-integer dimension"))  # the compiler's own parser
    cases.append((["--input-shape", "input_ids=1,400000000", "--input-shape", "attention_mask=1,400000000"],
                  "the random inputs would take more than 1024 MiB (input 'input_ids' at batch 1)"))
    cases.append(([*SEQ, "--batch", "4"], "--input-shape gives batch 2 (axis 0) but --batch is 4"))
    cases.append(([*SEQ, "--data", tmp_path / "partial.npz"], "either --input-shape or --data"))
    for args, message in cases:
        res = _invoke(bert_tiny, *FAST, *args, "--json")
        assert res.exit_code == 2, (args, res.output)
        assert message in json.loads(res.stdout)["message"], (args, res.output)
        assert "Traceback" not in res.output
