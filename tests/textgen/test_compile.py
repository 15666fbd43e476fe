"""edgeml compile --task text-generation: export, INT8/INT4 candidates judged by perplexity, the artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeml.errors import ArtifactError, ModelError, UsageError


def test_exported_ir_matches_transformers_logits_with_and_without_kv_cache(tiny_model_dir: Path, tmp_path: Path):
    import torch
    from transformers import LlamaForCausalLM

    from edgeml.compiler.textgen_export import export_openvino
    from edgeml.runtime.textgen import DecoderEngine

    shape = export_openvino(tiny_model_dir, tmp_path / "m.xml")
    ids = np.array([5, 17, 99, 200, 3, 44, 12, 7], np.int64)
    with torch.no_grad():
        ref = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()(torch.from_numpy(ids)[None]).logits[0].numpy()
    engine = DecoderEngine(tmp_path / "m.xml", shape.layers, shape.kv_heads, shape.head_dim)
    np.testing.assert_allclose(engine.logits(ids), ref, atol=1e-4, rtol=1e-4)
    logits, keys, values = engine.step(ids[:5], 0, None, None)           # prefill 5, then one token at a time
    for t in range(5, 8):
        logits, keys, values = engine.step(ids[t:t + 1], t, keys, values)
        np.testing.assert_allclose(logits[-1], ref[t], atol=1e-4, rtol=1e-4)
    assert keys.shape == (shape.layers, 1, shape.kv_heads, 8, shape.head_dim)


def test_compile_builds_int8_and_int4_candidates_and_selects_within_the_perplexity_tolerance(compiled):
    path, report = compiled
    labels = {c["label"]: c for c in report["candidates"]}
    assert "openvino/fp32" in labels and "openvino/int8-weights" in labels
    int4 = [c for c in report["candidates"] if c["precision"] == "int4"]
    assert {c["weight_compression"] for c in int4} == {"int4_sym", "int4_asym"}
    assert [c["data_aware"] for c in int4].count(True) == 1          # AWQ + scale estimation on calibration text
    for c in report["candidates"]:
        assert c["status"] in ("passed", "rejected"), c
        assert c["perplexity"] is not None and c["perplexity"] > 1.0
        if c["status"] == "passed":          # measured in its own process
            assert c["decode_tokens_per_s"] > 0 and c["peak_rss_mb"] > 0
    # weight compression shrinks the weights: int4 < int8 < fp32
    assert max(c["weights_bytes"] for c in int4) < labels["openvino/int8-weights"]["weights_bytes"] \
        < labels["openvino/fp32"]["weights_bytes"]
    q = report["quality"]
    assert q["metric"] == "perplexity" and q["data"] == "python-stdlib-heldout"
    assert q["compiled"] <= q["fp32"] * (1 + q["max_increase_pct"] / 100)
    assert [c["label"] for c in report["candidates"] if c["selected"]] == [report["selection"]["label"]]
    assert path.is_file()


def test_artifact_carries_tokenizer_kv_budget_selftest_and_verifies_signed(compiled, signing_key: Path):
    from edgeml.runtime.artifact import verify_archive

    path, report = compiled
    checked = verify_archive(path, trusted_keys=[signing_key.with_name(signing_key.name + ".pub")])
    assert checked.signer is not None
    m = checked.manifest
    assert m["task"] == "text-generation" and m["backend"]["name"] == "openvino"
    assert {"model/model.xml", "model/model.bin", "tokenizer/tokenizer.json"} <= set(m["files"])
    gen = m["generation"]
    assert gen["tokenizer"] == "tokenizer/tokenizer.json"
    kv = gen["kv_cache"]
    shape = gen["shape"]
    assert kv["bytes_per_token"] == 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 4
    assert kv["sequences_at_full_context"] == 4       # the default budget: four full contexts
    assert len(gen["selftest"]["greedy_ids"]) == 8
    assert m["precision"] == next(c["precision"] for c in report["candidates"] if c["selected"])


def test_a_tampered_text_generation_artifact_is_refused(compiled, tmp_path: Path):
    import zipfile

    from edgeml.runtime.textgen import TextGenModel

    path, _ = compiled
    bad = tmp_path / "bad.edgepkg"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "tokenizer/tokenizer.json":
                data = data.replace(b"<|endoftext|>", b"<|endoftexX|>", 1)
            dst.writestr(info, data)
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json"):
        TextGenModel.open(bad, cache_dir=tmp_path / "cache")


def test_non_llama_configs_and_bad_options_are_refused_with_one_line(tiny_model_dir: Path, tmp_path: Path):
    from edgeml.compiler.textgen import compile_text_generation
    from edgeml.compiler.textgen_export import read_shape

    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported"):
        read_shape(other)
    with pytest.raises(UsageError, match="no config.json"):
        read_shape(tmp_path)
    with pytest.raises(UsageError, match="max-perplexity-increase"):
        compile_text_generation(tiny_model_dir, target="x86_64", output=tmp_path / "x.edgepkg",
                                max_perplexity_increase=-1)
    with pytest.raises(UsageError, match="do not apply"):
        compile_text_generation(tiny_model_dir, target="x86_64", output=tmp_path / "x.edgepkg", prune="0.5")
    assert not (tmp_path / "x.edgepkg").exists()


def test_cli_refusal_is_one_line_without_traceback(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "compile", str(tmp_path), "--task", "text-generation",
                           "-t", "x86_64", "-o", str(tmp_path / "o.edgepkg")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "tokenizer.json" in proc.stderr or "model_type 'bert'" in proc.stderr
    assert not (tmp_path / "o.edgepkg").exists()


def test_bench_generate_scenario_reports_ttft_itl_and_tokens_per_s_at_1_and_4(compiled):
    path, _ = compiled
    proc = subprocess.run([sys.executable, "-m", "edgeml.cli", "bench", str(path), "--scenario", "generate",
                           "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result["concurrency"]) == {"1", "4"}
    for row in result["concurrency"].values():
        assert row["tokens_per_s"] > 0 and row["ttft_ms"]["p50"] > 0 and row["inter_token_ms"]["p99"] > 0
    assert result["peak_rss_mb"] > 0 and result["new_tokens"] == 6


def test_bench_generate_refuses_an_ordinary_artifact(tmp_path: Path):
    from edgeml.benchmarks.generate import bench_artifact

    (tmp_path / "x.edgepkg").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a text-generation artifact"):
        bench_artifact(tmp_path / "x.edgepkg")


def test_with_source_date_epoch_two_compiles_are_byte_identical(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from edgeml.compiler.textgen import compile_text_generation

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.edgepkg"
        result = compile_text_generation(tiny_model_dir, target="x86_64", output=out, precision="int8",
                                         benchmark=False, eval_tokens=512)
        assert result.manifest["provenance"]["created"] == "2023-11-14T22:13:20Z"
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
