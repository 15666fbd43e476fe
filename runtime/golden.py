"""The one reader (and writer) of golden self-test data: ``selftest/golden.npz``.

Golden data is ``in:NAME.npy`` / ``out:NAME.npy`` arrays in a stored ZIP. Reading
always verifies: the file's sha256 against the manifest, the npz's own size
(it is a ZIP too: no inflating bombs), no pickles, and names/dtypes against the
manifest's inputs and outputs. ``golden_inputs_from_archive`` reads it straight
from an ``.edgepkg`` after verifying the whole archive (the fleet's probe).
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

from edgeml.errors import ArtifactError
from edgeml.runtime.archive import file_matches
from edgeml.runtime.manifest import Manifest

if TYPE_CHECKING:
    import numpy as np

MAX_GOLDEN_BYTES = 64 << 20          # uncompressed arrays of one golden file
MAX_GOLDEN_ARRAYS = 2048
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

Golden = tuple[dict[str, "np.ndarray"], dict[str, "np.ndarray"]]


def golden_npz_bytes(inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> bytes:
    """Deterministic .npz of golden self-test data (``in:NAME`` / ``out:NAME``)."""
    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for prefix, arrays in (("in:", inputs), ("out:", outputs)):
            for name in sorted(arrays):
                arr_buf = io.BytesIO()
                np.lib.format.write_array(arr_buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{prefix}{name}.npy", date_time=_ZIP_DATE)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def read_golden(path: Path, spec: Manifest | None = None) -> Golden:
    """(inputs, outputs) of an extracted golden file; with ``spec``, verified against the manifest first."""
    path = Path(path)
    if spec is not None:
        if spec.selftest is None:
            raise ArtifactError(f"{path}: the manifest has no selftest section")
        entry = spec.files[spec.selftest.file]
        if not file_matches(path, entry):
            raise ArtifactError(f"golden data {path} does not match its sha256 in the manifest (tampered?)",
                                hint="reload the artifact; its extracted copy is damaged")
    with open(path, "rb") as fh:
        return parse_golden(fh, str(path), spec)


def parse_golden(fileobj: IO[bytes], where: str, spec: Manifest | None = None) -> Golden:
    import numpy as np

    try:
        with zipfile.ZipFile(fileobj) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if len(infos) > MAX_GOLDEN_ARRAYS or total > MAX_GOLDEN_BYTES:
                raise ArtifactError(f"golden data {where} holds {len(infos)} arrays / {total} bytes; "
                                    f"at most {MAX_GOLDEN_ARRAYS} / {MAX_GOLDEN_BYTES} are allowed")
        fileobj.seek(0)
        with np.load(fileobj, allow_pickle=False) as data:
            inputs = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
            outputs = {k[4:]: data[k] for k in data.files if k.startswith("out:")}
    except ArtifactError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ArtifactError(f"golden data {where} is unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if spec is not None:
        _check_against(spec, inputs, outputs, where)
    return inputs, outputs


def _check_against(spec: Manifest, inputs: dict[str, Any], outputs: dict[str, Any], where: str) -> None:
    declared_in = {t.name: t.dtype for t in spec.inputs}
    declared_out = {t.name for t in spec.outputs}
    if set(inputs) != set(declared_in):
        raise ArtifactError(f"golden data {where} has inputs {sorted(inputs)}; the manifest declares "
                            f"{sorted(declared_in)}")
    for name, array in inputs.items():
        if array.dtype.name != declared_in[name]:
            raise ArtifactError(f"golden input '{name}' in {where} is {array.dtype.name}; the manifest "
                                f"declares {declared_in[name]}")
    unknown = sorted(set(outputs) - declared_out)
    if unknown:
        raise ArtifactError(f"golden data {where} has outputs {unknown} the manifest does not declare")


def golden_inputs_from_archive(path: Path, *, trusted_keys: list[Path] | None = None,
                               require_signature: bool | None = None) -> dict[str, "np.ndarray"] | None:
    """Golden inputs of an ``.edgepkg`` after verifying the whole archive; None without golden data."""
    from edgeml.runtime.archive import open_zip, stream_member
    from edgeml.runtime.artifact import verify_archive

    checked = verify_archive(Path(path), trusted_keys=trusted_keys, require_signature=require_signature)
    selftest = checked.spec.selftest
    if selftest is None:
        return None
    entry = checked.spec.files[selftest.file]
    if entry.size > MAX_GOLDEN_BYTES:
        raise ArtifactError(f"{path}: golden data is {entry.size} bytes; at most {MAX_GOLDEN_BYTES} are allowed")
    buf = io.BytesIO()
    with open_zip(Path(path)) as zf:
        stream_member(zf, zf.getinfo(selftest.file), entry, Path(path), buf)
    buf.seek(0)
    return parse_golden(buf, f"{path}:{selftest.file}", checked.spec)[0]
