"""Compile options: one dataclass, validated before any work starts.

Keywords that are not compile options must be some backend's typed option
(``edgeml.backends.<name>.Options``); anything else is refused with the valid
names and a "did you mean" (``tune_budjet`` -> ``tune_budget``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from edgeml.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
EVAL_BUDGET_S = 120.0   # per candidate; a slower one is scored on the samples it ran in that time
# Semantic Versioning 2.0.0 (https://semver.org), the official regular expression.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_input_shapes(value: Any) -> dict[str, tuple[int, ...]]:
    """``{"input": [1, 3, 224, 224]}`` or ``["input=1,3,224,224", ...]`` or one such string."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for text in value:
            name, sep, dims = str(text).partition("=")
            if not sep or not name.strip():
                raise UsageError(f"--input-shape {text!r} is not NAME=D0,D1,...", hint="e.g. --input-shape input=1,3,224,224")
            items.append((name.strip(), dims.replace("x", ",").split(",")))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in items:
        try:
            shape = tuple(int(str(d).strip()) for d in dims)
        except ValueError:
            raise UsageError(f"input shape for {name!r} has a non-integer dimension: {dims!r}",
                             hint="e.g. --input-shape input=1,3,224,224") from None
        if not shape or any(d <= 0 for d in shape):
            raise UsageError(f"input shape for {name!r} must be positive integers, got {list(shape)}")
        if name in shapes:
            raise UsageError(f"input shape for {name!r} given twice")
        shapes[name] = shape
    return shapes


@dataclass
class CompileOptions:
    model: str                                  # path to .onnx / .pt2, or "pkg.module:factory"
    target: str
    output: Path
    precision: str = "auto"
    backend: str = "auto"
    calib: Path | None = None
    eval: Path | None = None
    max_accuracy_drop: float = 1.0              # points (percentage points of the metric)
    metric: str = "auto"                        # auto (from the output's nature) | evaluate.METRICS (or alias)
    input_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    name: str | None = None
    version: str = "0.1.0"
    sign_key: Path | None = None
    cache_dir: Path | None = None
    use_cache: bool = True
    benchmark: bool = True
    benchmark_seconds: float = 3.0
    progress: Callable[[str], None] | None = None
    eval_budget_s: float = EVAL_BUDGET_S
    keep_fallback: bool = False                 # also write <out-stem>.fallback.edgepkg (compiler/fallback.py)
    isolation: str = "process"                  # process: candidates run in worker processes (compiler/worker.py)
    candidate_timeout_s: float = 120.0          # wall clock per worker step (load, golden run, timing request)
    candidate_memory_mb: int | None = None      # a worker's RSS limit; None: half of this machine's memory
    max_memory_mb: float | None = None          # budget: a candidate whose serving process peaks above is rejected
    max_size_mb: float | None = None            # budget: a candidate whose artifact members weigh more is rejected
    prune: Any = ()                             # channel ratios to prune (compiler/prune.py); () = none
    train: Path | None = None                   # training .npz for the pruned models' fine-tune
    fine_tune_epochs: int = 5
    train_loss: Callable[..., Any] | None = None   # Python API only: loss(outputs, targets) -> Tensor
    backend_options: dict[str, Any] = field(default_factory=dict)   # as given (cache key, provenance)
    # backend name -> its typed Options, filled by validate()
    typed_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_keywords(cls, model: Any, output: Any, keywords: dict[str, Any]) -> "CompileOptions":
        """Split ``compile(...)`` keywords into compile options and backend options, then validate."""
        own = {k: v for k, v in keywords.items() if k in COMPILE_KEYWORDS}
        rest = {k: v for k, v in keywords.items() if k not in COMPILE_KEYWORDS}
        label = str(model) if isinstance(model, (str, Path)) else f"<{type(model).__name__}>"
        return cls(model=label, target="", output=Path(output), backend_options=rest, **own).validate()

    def options_for(self, backend: str) -> Any:
        """The typed options of ``backend`` (its schema's defaults for keys not given)."""
        if backend not in self.typed_options:
            from edgeml.backends import get_backend

            self.typed_options[backend] = get_backend(backend).parse_options(self.backend_options)
        return self.typed_options[backend]

    def validate(self) -> "CompileOptions":
        if self.precision not in ("auto", *PRECISIONS):
            raise UsageError(f"unknown precision {self.precision!r}", hint="choose auto, fp32, fp16, bf16 or int8")
        self._validate_backend_options()
        self._validate_metric()
        if not _SEMVER.match(str(self.version)):
            raise UsageError(f"version {self.version!r} is not a semantic version", hint="use MAJOR.MINOR.PATCH, e.g. 1.0.0")
        if self.name is not None and not _NAME.match(self.name):
            raise UsageError(f"name {self.name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        try:
            self.max_accuracy_drop = float(self.max_accuracy_drop)
        except (TypeError, ValueError):
            raise UsageError(f"max_accuracy_drop {self.max_accuracy_drop!r} is not a number") from None
        if not (0.0 <= self.max_accuracy_drop <= 100.0):
            raise UsageError(f"max_accuracy_drop must be between 0 and 100 points, got {self.max_accuracy_drop}")
        if not isinstance(self.keep_fallback, bool):
            raise UsageError(f"keep_fallback must be true or false, got {self.keep_fallback!r}")
        self.output = Path(self.output)
        if self.output.exists() and self.output.is_dir():
            raise UsageError(f"output {self.output} is a folder", hint="give a file name, e.g. model.edgepkg")
        parent = self.output.parent
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"output folder {parent} is not a folder")
        if not isinstance(self.input_shape, dict) or any(not isinstance(v, tuple) for v in self.input_shape.values()):
            self.input_shape = parse_input_shapes(self.input_shape)
        self._validate_pruning()
        self._validate_isolation()
        for attr in ("calib", "eval", "sign_key", "cache_dir", "train"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, Path(value))
        if self.sign_key is not None and not self.sign_key.is_file():
            raise UsageError(f"signing key {self.sign_key} does not exist", hint="create one with: edgeml keygen KEY")
        return self

    def _validate_pruning(self) -> None:
        from edgeml.compiler.prune import parse_ratios

        self.prune = parse_ratios(self.prune)
        if self.train is not None:
            self.train = Path(self.train)
        try:
            self.fine_tune_epochs = int(self.fine_tune_epochs)
        except (TypeError, ValueError):
            raise UsageError(f"fine_tune_epochs {self.fine_tune_epochs!r} is not an integer") from None

    def _validate_isolation(self) -> None:
        if self.isolation not in ("process", "none"):
            raise UsageError(f"isolation {self.isolation!r} is not process or none",
                             hint="process (the default) runs each candidate in a worker; none only for measuring it")
        try:
            self.candidate_timeout_s = float(self.candidate_timeout_s)
            if self.candidate_memory_mb is not None:
                self.candidate_memory_mb = int(self.candidate_memory_mb)
        except (TypeError, ValueError):
            raise UsageError(f"candidate_timeout_s {self.candidate_timeout_s!r} / candidate_memory_mb "
                             f"{self.candidate_memory_mb!r} must be numbers") from None
        if not 1.0 <= self.candidate_timeout_s <= 86400.0:
            raise UsageError(f"candidate_timeout_s must be between 1 and 86400 seconds, got {self.candidate_timeout_s:g}")
        if self.candidate_memory_mb is not None and not 64 <= self.candidate_memory_mb <= 1 << 22:
            raise UsageError(f"candidate_memory_mb must be between 64 and 4194304, got {self.candidate_memory_mb}")
        for name in ("max_memory_mb", "max_size_mb"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UsageError(f"{name} {value!r} is not a number of MB") from None
            if not 0.0 < value <= 1e7:
                raise UsageError(f"{name} must be a positive number of MB, got {value:g}",
                                 hint=f"e.g. --{name.replace('_', '-')} 512")
            setattr(self, name, value)

    def _validate_metric(self) -> None:
        from edgeml.compiler.evaluate import METRIC_ALIASES, METRICS, metric_name

        try:
            self.metric = metric_name(str(self.metric))
        except ValueError:
            raise UsageError(f"unknown metric {self.metric!r}",
                             hint=f"choose auto, {', '.join(METRICS)} (or {', '.join(METRIC_ALIASES)})") from None

    def _validate_backend_options(self) -> None:
        from edgeml.backends import all_option_names, backend_names

        if self.backend not in ("auto", *backend_names()):
            raise UsageError(f"unknown backend {self.backend!r}",
                             hint=f"choose auto, {', '.join(backend_names())}")
        owners = all_option_names()
        for key in self.backend_options:
            if key not in owners:
                from edgeml.backends.options import unknown_option_error

                raise unknown_option_error(key, [*COMPILE_KEYWORDS, *owners])
        for backend in sorted(set(owners.values())):  # check every given value now, not minutes later
            self.options_for(backend)
        try:
            self.eval_budget_s = float(self.eval_budget_s)
        except (TypeError, ValueError):
            raise UsageError(f"eval_budget_s {self.eval_budget_s!r} is not a number of seconds") from None

    def key_dict(self) -> dict[str, Any]:
        """The options that affect the artifact's bytes (for the cache key and provenance)."""
        d = asdict(self)
        for k in ("model", "output", "calib", "eval", "sign_key", "cache_dir", "use_cache", "progress", "target",
                  "typed_options", "prune", "train", "fine_tune_epochs", "train_loss",
                  "isolation", "candidate_timeout_s", "candidate_memory_mb"):
            d.pop(k, None)
        if self.prune:  # only a pruning compile records it (the keys of earlier compiles stay)
            from edgeml.compiler.prune import digest

            d["prune"] = {"ratios": list(self.prune), "fine_tune_epochs": self.fine_tune_epochs,
                          "loss": digest(self.prune, self.fine_tune_epochs, self.train_loss)}
        if self.eval_budget_s == EVAL_BUDGET_S:  # keep the keys of earlier compiles (no new field unless set)
            d.pop("eval_budget_s")
        else:  # it was a backend option before it became a compile option
            d.pop("eval_budget_s")
            d["backend_options"] = {**self.backend_options, "eval_budget_s": self.eval_budget_s}
        if self.metric == "auto":  # keep the keys of earlier compiles (no new field unless set)
            d.pop("metric")
        if not self.keep_fallback:  # the same: only a compile that keeps a fallback records it
            d.pop("keep_fallback")
        for budget in ("max_memory_mb", "max_size_mb"):   # the same: only a budgeted compile records them
            if d.get(budget) is None:
                d.pop(budget, None)
        d["input_shape"] = {k: list(v) for k, v in sorted(self.input_shape.items())}
        d["backend_options"] = {k: _jsonable(v) for k, v in sorted(d["backend_options"].items())}
        return d


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


# The keyword names edgeml.compile() accepts besides backend options (the CLI's long options, with underscores).
COMPILE_KEYWORDS = tuple(f.name for f in fields(CompileOptions)
                         if f.name not in ("model", "target", "output", "backend_options", "typed_options"))
