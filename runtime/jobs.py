"""Batch and stream jobs on the device: ``edgeml run ART --input DIR|GLOB|-|file.npz --output DIR``
and ``edgeml run ART --mqtt-in TOPIC --mqtt-out TOPIC --broker URL``.

Batch: every input item (``.npy``: the array of a one-input model; ``.npz``: arrays keyed by
input name; ``.png/.jpg/.jpeg/.bmp`` when Pillow is installed and the model takes one image
tensor) is run alone and its outputs written to ``OUT/<name>.npz`` (temp file, fsync, rename:
never a partial file). An item whose output exists is skipped, so a rerun resumes where an
interrupted one stopped. Items are read one at a time, each bounded (``max_item_bytes``,
uncompressed for ``.npz``), so memory does not grow with the folder. A bad item is reported
(with the file and the reason) and the job goes on; the summary counts done, skipped, failed.

Stream: each MQTT message on ``--mqtt-in`` is a v2 inference request body (the JSON of
``POST /v2/models/{m}/infer``; the binary tensor extension is not used over MQTT), decoded
and validated by the server's own parser; the v2 response JSON (or ``{"error": ...}`` naming
the field) is published on ``--mqtt-out``. Latency and counters use the server's ``ModelStats``.
"""

from __future__ import annotations

import glob as globlib
import io
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeml.errors import DataError, EdgemlError, UsageError

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_ITEM_BYTES = 256 << 20           # one input file (uncompressed for .npz)
MAX_ITEMS = 10_000_000               # paths listed for one job
MAX_STDIN_LINE = 4096


@dataclass
class JobSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)     # the first 20: {"item", "error"}
    seconds: float = 0.0
    latency_ms_sum: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "failures": self.failures, "seconds": round(self.seconds, 3),
                "mean_latency_ms": round(self.latency_ms_sum / self.done, 3) if self.done else None}


# -- finding the items ---------------------------------------------------------
def list_items(spec: str, stdin: io.TextIOBase | None = None) -> list[tuple[Path, str]]:
    """(path, output name) for every item of DIR, GLOB or ``-`` (one path per line on stdin), sorted."""
    if spec == "-":
        paths = [Path(p) for p in _stdin_paths(stdin or sys.stdin)]   # type: ignore[arg-type]
        return _named(paths, None)
    root = Path(spec)
    if root.is_file() and _wanted(root):
        return _named([root], None)
    if root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file() and _wanted(p))
        return _named(paths, root)
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in globlib.iglob(spec, recursive=True) if Path(p).is_file() and _wanted(Path(p)))
        if not paths:
            raise UsageError(f"--input: the pattern {spec!r} matches no .npy/.npz/image file")
        return _named(paths, None)
    raise UsageError(f"--input: {spec!r} is not a folder, a glob pattern, '-' or an .npz file",
                     hint="give a folder of .npy/.npz files, a quoted pattern like 'data/*.npy', or '-'")


def _wanted(p: Path) -> bool:
    return p.suffix.lower() in ARRAY_SUFFIXES + IMAGE_SUFFIXES and not p.name.startswith(".")


def _stdin_paths(stream: io.TextIOBase) -> Iterator[str]:
    for n, line in enumerate(stream, 1):
        if n > MAX_ITEMS:
            raise UsageError(f"--input -: more than {MAX_ITEMS} paths on stdin; split the job")
        if len(line) > MAX_STDIN_LINE:
            raise UsageError(f"--input -: line {n} is over {MAX_STDIN_LINE} characters; give one path per line")
        line = line.strip()
        if line:
            yield line


def _named(paths: list[Path], root: Path | None) -> list[tuple[Path, str]]:
    """Output names: the path under ``root`` (folders kept), else the file name; a clash is refused up front."""
    if len(paths) > MAX_ITEMS:
        raise UsageError(f"--input holds more than {MAX_ITEMS} files; split the job")
    seen: dict[str, Path] = {}
    out = []
    for p in paths:
        rel = p.relative_to(root) if root is not None else Path(p.name)
        name = str(rel.with_suffix(".npz"))
        if name in seen:
            raise UsageError(f"--input: {seen[name]} and {p} would both write {name}",
                             hint="rename one of them, or run the two folders as separate jobs")
        seen[name] = p
        out.append((p, name))
    return out


# -- reading one item ------------------------------------------------------------
def read_item(path: Path, model: Any, max_bytes: int = MAX_ITEM_BYTES) -> dict[str, np.ndarray]:
    """The feeds of one item, cast to the model's dtypes; DataError naming the file on any problem."""
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise DataError(f"{path} is {size} bytes, over the {max_bytes}-byte limit per item")
    names = [s.name for s in model.inputs]
    if suffix == ".npz":
        _check_npz(path, max_bytes)
        from edgeml.compiler_data import load_npz_inputs

        feeds = load_npz_inputs(path, names)
    elif suffix == ".npy":
        if len(names) != 1:
            raise DataError(f"{path}: a .npy holds one array, but the model has inputs {names}",
                            hint="save the item as an .npz keyed by input name")
        try:
            feeds = {names[0]: np.load(path, allow_pickle=False)}
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path} is not a readable .npy: {exc}", hint="save it with numpy.save") from None
    else:
        feeds = {names[0]: read_image(path, model)}
    return cast_feeds(feeds, model, path)


def _check_npz(path: Path, max_bytes: int) -> None:
    """Refuse an .npz whose members would decompress past the limit (a zip bomb), before loading it."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz: {exc}", hint="save it with numpy.savez") from None
    total = sum(i.file_size for i in infos)
    if len(infos) > 1024 or total > max_bytes:
        raise DataError(f"{path} holds {len(infos)} arrays of {total} bytes uncompressed, over the limit of "
                        f"1024 arrays / {max_bytes} bytes per item")


def read_image(path: Path, model: Any) -> np.ndarray:
    """An image as the model's one 4-D input (NCHW or NHWC, 1 or 3 channels): resized, float in [0, 1] or uint8."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: reading images needs Pillow", hint="pip install pillow, or give .npy files") from None
    spec = model.inputs[0]
    shape = spec.shape
    if len(model.inputs) != 1 or len(shape) != 4:
        raise DataError(f"{path}: the model's input is not one image tensor (it is {[s.to_dict() for s in model.inputs]})",
                        hint="give .npy/.npz items for this model")
    nchw = shape[1] in (1, 3)
    c, h, w = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
    if c not in (1, 3) or h is None or w is None:
        raise DataError(f"{path}: the model's input shape {list(shape)} is not a fixed-size 1- or 3-channel image")
    Image.MAX_IMAGE_PIXELS = 64 << 20                    # decompression-bomb guard
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if c == 1 else "RGB").resize((w, h)))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path} is not a readable image: {exc}") from None
    arr = arr.reshape(h, w, c)
    if nchw:
        arr = arr.transpose(2, 0, 1)
    arr = arr[None]
    return arr if np.dtype(spec.dtype) == np.uint8 else (arr.astype(np.float32) / 255.0).astype(spec.dtype)


def cast_feeds(feeds: dict[str, np.ndarray], model: Any, source: Path | str) -> dict[str, np.ndarray]:
    """Cast each array to its input's dtype; one that cannot be (strings, objects) is a DataError."""
    out = {}
    for name, value in feeds.items():
        want = model._input_by_name[name].dtype
        try:
            out[name] = value.astype(want, copy=False)
        except (ValueError, TypeError) as exc:
            raise DataError(f"input file {source}: array {name!r} ({value.dtype}) cannot be read as {want}: {exc}",
                            hint="save the arrays with the dtype the model expects (edgeml inspect shows it)") from None
    return out


# -- the batch job -----------------------------------------------------------------
def run_batch(model: Any, items: list[tuple[Path, str]], out_dir: Path,
              progress: Callable[[int, int, str, str], None] | None = None,
              max_item_bytes: int = MAX_ITEM_BYTES) -> JobSummary:
    """Run every item not done yet; write ``out_dir/<name>`` atomically; go on past bad items."""
    from edgeml.runtime.fsutil import atomic_path

    summary = JobSummary(total=len(items))
    t_start = time.perf_counter()
    for i, (src, name) in enumerate(items, 1):
        dest = out_dir / name
        if dest.exists():
            summary.skipped += 1
            status = "skipped"
        else:
            try:
                feeds = read_item(src, model, max_item_bytes)
                t0 = time.perf_counter()
                outputs = model.predict(feeds)
                summary.latency_ms_sum += (time.perf_counter() - t0) * 1000.0
                with atomic_path(dest) as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, **outputs)
                summary.done += 1
                status = "done"
            except EdgemlError as exc:
                status = _failed(summary, src, exc.message)
            except OSError as exc:       # e.g. disk full: the temp file is gone, the target untouched
                if not dest.parent.is_dir() or getattr(exc, "errno", None) == 28:
                    raise UsageError(f"--output: cannot write {dest}: {exc.strerror or exc}") from None
                status = _failed(summary, src, f"{type(exc).__name__}: {exc}")
        if progress is not None:
            progress(i, len(items), str(src), status)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _failed(summary: JobSummary, src: Path, message: str) -> str:
    summary.failed += 1
    if len(summary.failures) < 20:
        summary.failures.append({"item": str(src), "error": message})
    return "failed"


def prepare_output_dir(text: str, input_spec: str | None = None) -> Path:
    """``--output DIR`` for a batch job: an existing folder, or a new one whose parent exists; never
    inside the input folder (its outputs would be read as inputs by the next run)."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {text!r} is a file; batch jobs write one .npz per item into a folder")
    if input_spec is not None and Path(input_spec).is_dir() and (
            out.resolve() == Path(input_spec).resolve() or out.resolve().is_relative_to(Path(input_spec).resolve())):
        raise UsageError(f"--output {text!r} is inside the input folder {input_spec!r}",
                         hint="write the outputs to a folder outside the input folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise UsageError(f"--output {text!r}: its parent folder {out.parent} does not exist")
        try:
            out.mkdir()
        except OSError as exc:
            raise UsageError(f"--output {text!r}: cannot create it: {exc.strerror or exc}") from None
    return out
