"""One way for tests/backends to compile with the null TEST DOUBLE backend (fp32, no cache, no timing by default)."""

from __future__ import annotations

from edgeml.compiler import compile_with_report


def compile_null(model, data, tmp_path, candidates, **kw):
    kw.setdefault("target", "x86_64")
    kw.setdefault("benchmark", False)
    return compile_with_report(model, output=tmp_path / "out.edgepkg", backend="null", eval=data, cache_dir=False,
                               precision="fp32", null_candidates=candidates, **kw)


def by_label(result) -> dict[str, dict]:
    return {c["label"]: c for c in result.candidates}
