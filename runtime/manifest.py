"""The one typed schema of ``manifest.json``, validated at load.

``Manifest.from_dict(obj)`` is strict: anything a reader relies on is checked
for type and range, and a problem is ONE ``ArtifactError`` naming the field path
(``manifest field 'inputs[0].shape': expected a list of integers or null, got 'abc'``).
Stdlib only: a device installs numpy and one backend, nothing else.

Typed fields are what the runtime reads. The compiler's evidence (``candidates``,
``selection``, ``accuracy``, ``provenance``, ``quantization``, ``drift_profile``)
and keys a newer edgeml may add are kept in ``info`` as bounded JSON, read by
nobody on a device. Member names follow ``canonical_member_problem``; every path
the manifest names (``backend.entrypoint``, ``backend.options.params``,
``selftest.file``) must be a member listed in ``files``.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Union

from edgeml.errors import ArtifactError
from edgeml.runtime.dtypes import DTYPE_NAMES

SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")   # int4: weight-compressed decoders (text generation)
RESERVED_MEMBERS = frozenset({"manifest.json", "manifest.sig"})
MEMBER_OPTION_KEYS = ("params",)       # backend options whose value is a member name (TVM params)
MAX_JSON_DEPTH = 64                    # nesting of any JSON value in the manifest
MAX_JSON_ITEMS = 1_000_000             # values in the whole manifest (8 MiB of JSON holds ~4 M)
MAX_FILES = 10_000                     # members listed in ``files`` (the archive reader uses the same cap)
MAX_NAME_CHARS = 1024                  # a member name, and any identifier string
MAX_TENSORS = 1024                     # entries of ``inputs`` / ``outputs``
MAX_RANK = 32
MAX_DIM = 1 << 40
MAX_THREADS = 4096                     # more is an absurd request, refused; less is clamped to the host
MAX_CACHE_MB = 1 << 16                # a response cache of up to 64 GiB per model
MAX_FEATURES = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")

JsonValue = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Field:
    """A field path for error messages: ``inputs[0].shape``."""

    def __init__(self, where: str, path: str = ""):
        self.where, self.path = where, path

    def key(self, name: str) -> "_Field":
        return _Field(self.where, f"{self.path}.{name}" if self.path else name)

    def item(self, name: str) -> "_Field":
        return _Field(self.where, f"{self.path}[{name!r}]")

    def index(self, i: int) -> "_Field":
        return _Field(self.where, f"{self.path}[{i}]")

    def fail(self, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.where} field '{self.path or '<root>'}': {problem}",
                             hint="recompile the artifact with this edgeml, or fix the tool that wrote it")

    def expect(self, what: str, value: object) -> ArtifactError:
        return self.fail(f"expected {what}, got {_show(value)}")


def canonical_member_problem(name: object) -> str | None:
    """Why ``name`` is not a canonical member name (None when it is).

    Canonical: a relative POSIX path of non-empty parts, none of them ``.`` or ``..``,
    no backslash, no control character (NUL...), no drive letter, at most MAX_NAME_CHARS.
    So ``a/./b``, ``a//b``, ``a/b/.``, ``a/``, ``/a`` and ``..`` are all refused: each is
    another spelling of a listed member (or of a path outside the folder).
    """
    if not isinstance(name, str) or not name:
        return "is empty or not a string"
    if len(name) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character (NUL, newline...)"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "escapes the artifact folder (a '..' part)"
    if any(p in ("", ".") for p in parts):
        return "is not in canonical form (an empty or '.' part: another spelling of a member)"
    if ":" in parts[0]:
        return "starts with a drive letter or scheme"
    return None


def require_canonical_member(name: object, where: str) -> str:
    problem = canonical_member_problem(name)
    if problem is not None:
        raise ArtifactError(f"{where}: member name {_show(name)} {problem}; refusing it",
                            hint="artifacts hold plain relative member names; recompile it")
    assert isinstance(name, str)
    return name


def collision_key(name: str) -> str:
    """Two names with the same key would be one file on some filesystem (NFC + case-fold)."""
    return unicodedata.normalize("NFC", name).casefold()


def check_json_bounds(value: object, where: _Field) -> None:
    """Refuse a JSON tree deeper than MAX_JSON_DEPTH or larger than MAX_JSON_ITEMS (iteratively)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > MAX_JSON_ITEMS:
            raise where.fail(f"holds more than {MAX_JSON_ITEMS} values")
        if isinstance(node, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise where.fail(f"is nested deeper than {MAX_JSON_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


# ----------------------------------------------------------------------------- field readers
def _obj(value: object, f: _Field) -> dict[str, object]:
    if not isinstance(value, dict):
        raise f.expect("an object", value)
    return value


def _str(value: object, f: _Field, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value) or len(value) > MAX_NAME_CHARS:
        raise f.expect("a string" if empty else "a non-empty string", value)
    return value


def _int(value: object, f: _Field, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise f.expect(f"an integer from {low} to {high}", value)
    return value


def _number(value: object, f: _Field, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
        raise f.expect("a positive number" if positive else "a number >= 0", value)
    return float(value)  # type: ignore[arg-type]


def _optional(obj: Mapping[str, object], key: str) -> object:
    return obj.get(key)


def _member_ref(value: object, f: _Field, files: Mapping[str, "FileEntry"]) -> str:
    name = _str(value, f)
    problem = canonical_member_problem(name)
    if problem is not None:
        raise f.fail(f"{_show(name)} {problem}")
    if name not in files:
        raise f.fail(f"{_show(name)} is not a member listed in 'files'")
    return name


# ----------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    @classmethod
    def parse(cls, value: object, f: _Field) -> "FileEntry":
        if not isinstance(value, dict) or set(value) != {"sha256", "size"}:
            raise f.expect("an object {sha256, size}", value)
        digest = value["sha256"]
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise f.key("sha256").expect("64 lowercase hex digits", digest)
        return cls(digest, _int(value["size"], f.key("size"), 0, 1 << 50))

    def to_dict(self) -> dict[str, JsonValue]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str                         # a numpy dtype name of edgeml.runtime.dtypes
    shape: tuple[int | None, ...]      # None = dynamic axis

    @classmethod
    def parse(cls, value: object, f: _Field) -> "TensorDecl":
        obj = _obj(value, f)
        name = _str(obj.get("name"), f.key("name"))
        dtype = obj.get("dtype")
        if dtype not in DTYPE_NAMES:
            raise f.key("dtype").expect(f"one of {sorted(DTYPE_NAMES)}", dtype)
        raw = obj.get("shape")
        shape_f = f.key("shape")
        if not isinstance(raw, list) or len(raw) > MAX_RANK:
            raise shape_f.expect(f"a list of at most {MAX_RANK} integers or null", raw)
        shape: list[int | None] = []
        for i, dim in enumerate(raw):
            if dim is None or (type(dim) is int and dim == -1):
                shape.append(None)
            else:
                shape.append(_int(dim, shape_f.index(i), 0, MAX_DIM))
        return cls(name, str(dtype), tuple(shape))

    def to_dict(self) -> dict[str, JsonValue]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class BackendDecl:
    name: str
    version: str
    entrypoint: str                                   # a member listed in ``files``
    options: Mapping[str, JsonValue] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: object, f: _Field, files: Mapping[str, FileEntry]) -> "BackendDecl":
        obj = _obj(value, f)
        options = _obj(obj.get("options", {}), f.key("options"))
        for key in MEMBER_OPTION_KEYS:
            if options.get(key) is not None:
                _member_ref(options[key], f.key("options").key(key), files)
        return cls(name=_str(obj.get("name"), f.key("name")),
                   version=_str(obj.get("version", ""), f.key("version"), empty=True),
                   entrypoint=_member_ref(obj.get("entrypoint"), f.key("entrypoint"), files),
                   options=MappingProxyType(dict(options)))  # type: ignore[arg-type]

    def members(self) -> list[str]:
        refs = [self.options.get(k) for k in MEMBER_OPTION_KEYS]
        return [self.entrypoint] + [r for r in refs if isinstance(r, str)]

    def to_dict(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "entrypoint": self.entrypoint,
                "options": dict(self.options)}


@dataclass(frozen=True)
class RuntimeDecl:
    threads: int | None = None          # None or 0 = all cores; clamped to the host at load
    cache_mb: float | None = None       # serve's response cache for this model (None/0 = off)
    deterministic: bool = True          # False: same inputs may give other outputs, never cached
    fallback: str | None = None         # file name of a sibling .edgepkg to serve when this one fails

    @classmethod
    def parse(cls, value: object, f: _Field) -> "RuntimeDecl":
        obj = _obj(value, f)
        threads, cache_mb, fallback = obj.get("threads"), obj.get("cache_mb"), obj.get("fallback")
        deterministic = obj.get("deterministic", True)
        if not isinstance(deterministic, bool):
            raise f.key("deterministic").expect("true or false", deterministic)
        mb = None if cache_mb is None else _number(cache_mb, f.key("cache_mb"))
        if mb is not None and mb > MAX_CACHE_MB:
            raise f.key("cache_mb").expect(f"a number of MiB from 0 to {MAX_CACHE_MB}", cache_mb)
        name = None if fallback is None else _str(fallback, f.key("fallback"))
        if name is not None and (name in (".", "..") or "/" in name or "\\" in name or "\0" in name):
            raise f.key("fallback").expect("a file name in the artifact's folder (no path)", fallback)
        return cls(None if threads is None else _int(threads, f.key("threads"), 0, MAX_THREADS),
                   None if mb is None else float(mb), deterministic, name)

    def to_dict(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {"threads": self.threads}
        if self.cache_mb is not None:
            out["cache_mb"] = self.cache_mb
        if not self.deterministic:
            out["deterministic"] = False
        if self.fallback is not None:
            out["fallback"] = self.fallback
        return out


@dataclass(frozen=True)
class SelftestDecl:
    file: str                           # a member listed in ``files``
    rtol: float = 1e-3
    atol: float = 1e-4
    samples: int | None = None
    reference: str | None = None        # compiled | fp32
    latency_budget_ms: float | None = None

    @classmethod
    def parse(cls, value: object, f: _Field, files: Mapping[str, FileEntry]) -> "SelftestDecl":
        obj = _obj(value, f)
        samples, reference, budget = obj.get("samples"), obj.get("reference"), obj.get("latency_budget_ms")
        return cls(
            file=_member_ref(obj.get("file"), f.key("file"), files),
            rtol=_number(obj.get("rtol", 1e-3), f.key("rtol")),
            atol=_number(obj.get("atol", 1e-4), f.key("atol")),
            samples=None if samples is None else _int(samples, f.key("samples"), 0, 1 << 31),
            reference=None if reference is None else _str(reference, f.key("reference")),
            latency_budget_ms=None if budget is None else _number(budget, f.key("latency_budget_ms"), positive=True),
        )

    def to_dict(self) -> dict[str, JsonValue]:
        return {"file": self.file, "rtol": self.rtol, "atol": self.atol, "samples": self.samples,
                "reference": self.reference, "latency_budget_ms": self.latency_budget_ms}


_TYPED_KEYS = ("schema_version", "name", "version", "target", "arch", "device", "required_features", "backend",
               "precision", "inputs", "outputs", "files", "runtime", "selftest")
_REQUIRED_KEYS = ("schema_version", "name", "version", "target", "arch", "required_features", "backend",
                  "precision", "inputs", "outputs", "files")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``to_dict()`` gives the JSON object to write."""

    schema_version: int
    name: str
    version: str
    target: str
    arch: str
    required_features: tuple[str, ...]
    backend: BackendDecl
    precision: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    files: Mapping[str, FileEntry]
    device: str | None = None
    runtime: RuntimeDecl | None = None
    selftest: SelftestDecl | None = None
    info: Mapping[str, JsonValue] = field(default_factory=dict)   # compiler evidence, never read on a device

    @classmethod
    def from_dict(cls, obj: object, where: str = "manifest") -> "Manifest":
        root = _Field(where)
        if not isinstance(obj, dict):
            raise ArtifactError(f"{where}: expected a JSON object, got {_show(obj)}",
                                hint="the artifact is damaged or was not written by edgeml")
        check_json_bounds(obj, root)
        missing = [k for k in _REQUIRED_KEYS if k not in obj]
        if missing:
            raise ArtifactError(f"{where} lacks required keys {missing}")
        version = obj["schema_version"]
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise ArtifactError(f"{where} has schema_version {_show(version)}; this edgeml reads {SCHEMA_VERSION}",
                                hint="upgrade edgeml on this device or recompile the artifact")
        files = _parse_files(obj["files"], root.key("files"))
        return cls(
            schema_version=SCHEMA_VERSION,
            name=_str(obj["name"], root.key("name")),
            version=_str(obj["version"], root.key("version")),
            target=_str(obj["target"], root.key("target")),
            arch=_str(obj["arch"], root.key("arch")),
            required_features=_parse_features(obj["required_features"], root.key("required_features")),
            backend=BackendDecl.parse(obj["backend"], root.key("backend"), files),
            precision=_parse_precision(obj["precision"], root.key("precision")),
            inputs=_parse_tensors(obj["inputs"], root.key("inputs")),
            outputs=_parse_tensors(obj["outputs"], root.key("outputs")),
            files=files,
            device=None if obj.get("device") is None else _str(obj["device"], root.key("device")),
            runtime=None if obj.get("runtime") is None else RuntimeDecl.parse(obj["runtime"], root.key("runtime")),
            selftest=(None if obj.get("selftest") is None
                      else SelftestDecl.parse(obj["selftest"], root.key("selftest"), files)),
            info=MappingProxyType({k: v for k, v in obj.items() if k not in _TYPED_KEYS}),
        )

    @classmethod
    def from_json(cls, raw: bytes, where: str = "manifest") -> "Manifest":
        return cls.from_dict(parse_json(raw, where), where)

    def members(self) -> list[str]:
        """Every member the manifest names besides ``files`` itself (all listed in ``files``)."""
        return self.backend.members() + ([self.selftest.file] if self.selftest else [])

    def to_dict(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = dict(self.info)
        out.update({
            "schema_version": self.schema_version, "name": self.name, "version": self.version,
            "target": self.target, "arch": self.arch, "required_features": list(self.required_features),
            "backend": self.backend.to_dict(), "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "files": {n: e.to_dict() for n, e in sorted(self.files.items())},
        })
        if self.device is not None:
            out["device"] = self.device
        if self.runtime is not None:
            out["runtime"] = self.runtime.to_dict()
        if self.selftest is not None:
            out["selftest"] = self.selftest.to_dict()
        return out


def _parse_files(value: object, f: _Field) -> Mapping[str, FileEntry]:
    obj = _obj(value, f)
    if len(obj) > MAX_FILES:
        raise f.fail(f"lists {len(obj)} members; at most {MAX_FILES} are allowed")
    seen: dict[str, str] = {}
    out: dict[str, FileEntry] = {}
    for name, entry in obj.items():
        problem = canonical_member_problem(name) or ("is reserved" if name in RESERVED_MEMBERS else None)
        if problem is not None:
            raise f.fail(f"member name {_show(name)} {problem}")
        key = collision_key(name)
        if key in seen:
            raise f.fail(f"member names {_show(seen[key])} and {_show(name)} name the same file "
                         "on a case-insensitive filesystem")
        seen[key] = name
        out[name] = FileEntry.parse(entry, f.item(name))
    return MappingProxyType(out)


def _parse_features(value: object, f: _Field) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_FEATURES:
        raise f.expect(f"a list of at most {MAX_FEATURES} CPU feature names", value)
    return tuple(_str(v, f.index(i)) for i, v in enumerate(value))


def _parse_precision(value: object, f: _Field) -> str:
    if value not in PRECISIONS:
        raise f.expect(f"one of {list(PRECISIONS)}", value)
    return str(value)


def _parse_tensors(value: object, f: _Field) -> tuple[TensorDecl, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_TENSORS:
        raise f.expect(f"a list of 1 to {MAX_TENSORS} tensors {{name, dtype, shape}}", value)
    tensors = tuple(TensorDecl.parse(v, f.index(i)) for i, v in enumerate(value))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise f.fail("tensor names are not unique")
    return tensors


def parse_json(raw: bytes, where: str) -> object:
    """Strict JSON for manifests and signatures: UTF-8, no NaN/Infinity, no duplicate keys, bounded depth."""
    def no_constant(token: str) -> object:
        raise ValueError(f"{token} is not allowed")

    def unique_keys(pairs: Iterable[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {_show(key)}")
            out[key] = value
        return out

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=unique_keys)
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{where} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ArtifactError(f"{where} is nested too deeply to be a manifest") from None
    except ValueError as exc:
        raise ArtifactError(f"{where} is not valid JSON ({str(exc)[:200]})") from None
