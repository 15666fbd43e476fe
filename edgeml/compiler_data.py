"""Reading ``.npz`` data files (inputs, calibration, eval); shared by run and compile."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edgeml.errors import DataError


def load_npz(path: Path, what: str = "data") -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what} file {path} is not a readable .npz: {exc}", hint="save it with numpy.savez") from exc


def load_npz_inputs(path: Path, input_names: list[str], what: str = "input") -> dict[str, np.ndarray]:
    """Arrays keyed by model input name; extra keys (labels, reference_*) are ignored."""
    data = load_npz(path, what)
    missing = [n for n in input_names if n not in data]
    if missing:
        raise DataError(
            f"{what} file {path} has no array for model input {missing[0]!r} (it has {sorted(data)})",
            hint="key the arrays by the model's input names (edgeml inspect shows them)",
        )
    arrays = {n: data[n] for n in input_names}
    counts = {n: a.shape[0] if a.ndim else 0 for n, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{what} file {path}: inputs have different sample counts {counts}")
    return arrays
