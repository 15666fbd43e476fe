"""null backend, compiler side: one candidate per ``null_candidates`` entry, "built" into a JSON file."""

from __future__ import annotations

import json
import time
from typing import Any

from edgeml.backends.base import BuildContext, BuiltCandidate, CandidateSpec, CompilerBackend
from edgeml.backends.null import BACKEND, Options
from edgeml.errors import CompileError

ENTRY = "model/null.json"
VERSION = "1.0"
DEFAULT_CANDIDATES: dict[str, dict[str, Any]] = {"exact": {}}


def _options(ctx: BuildContext) -> Options:
    if isinstance(ctx.options, Options):
        return ctx.options
    parsed: Options = BACKEND.parse_options(ctx.options or {}, strict=True)
    return parsed


class NullCompiler(CompilerBackend):
    name = "null"

    def version(self) -> str:
        return VERSION

    def candidates(self, ctx: BuildContext, precisions: list[str]) -> list[CandidateSpec]:
        wanted = _options(ctx).null_candidates or DEFAULT_CANDIDATES
        specs = []
        for name, knobs in wanted.items():
            precision = knobs.get("precision", "fp32")
            if precision in precisions:
                specs.append(CandidateSpec(self.name, precision, {"null": name, **knobs}, f"null/{precision}/{name}"))
        return specs

    def build(self, spec: CandidateSpec, ctx: BuildContext) -> BuiltCandidate:
        start = time.perf_counter()
        if spec.recipe.get("build_fails"):
            raise CompileError(f"null candidate {spec.recipe.get('null')!r}: build failure requested (build_fails)")
        out = ctx.workdir / "null" / str(spec.recipe.get("null", "candidate"))
        out.mkdir(parents=True, exist_ok=True)
        config = {k: spec.recipe.get(k, default) for k, default in
                  (("latency_ms", 0.0), ("error", 0.0), ("verify_fails", False), ("crash", None), ("crash_after", 0), ("hang", False),
                   ("allocate_mb", 0))}
        path = out / "null.json"
        path.write_text(json.dumps(config, sort_keys=True))
        return BuiltCandidate(spec=spec, files={ENTRY: path}, entrypoint=ENTRY, backend_options={},
                              recipe=dict(spec.recipe), notes=["null backend: a test double, not a model"],
                              build_seconds=time.perf_counter() - start)
