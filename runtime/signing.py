"""Ed25519 keys and signatures for artifacts (and fleet messages).

Private keys are PEM (PKCS#8, unencrypted, mode 0600); public keys are PEM
(SubjectPublicKeyInfo). A key id is the first 16 hex digits of the sha256 of
the raw 32-byte public key, so a signature names the key that made it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from edgeml.errors import SignatureError, UsageError, summarize_names


def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def key_id_of(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``private_path`` (0600) and ``private_path.pub``; returns both paths."""
    serialization, ed25519 = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise UsageError(f"{private_path} or {public_path} already exists", hint="choose another path or pass --force")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    from edgeml.runtime.fsutil import atomic_write_bytes

    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem, mode=0o644)
    return private_path, public_path


def load_private_key(path: Path):
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read private key {path}: {exc}", hint="create one with: edgeml keygen KEY") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key", hint="create one with: edgeml keygen KEY")
    return key


def load_public_key(path: Path):
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot read public key {path}: {exc}", hint="pass the KEY.pub written by edgeml keygen") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign_bytes(data: bytes, private_key_path: Path) -> dict:
    key = load_private_key(private_key_path)
    signature = key.sign(data)
    return {
        "algorithm": "ed25519",
        "key_id": key_id_of(key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


_SIGNATURE_KEYS = ("algorithm", "key_id", "signature")


def parse_signature(raw: bytes, where: str) -> dict[str, str]:
    """A ``manifest.sig`` as ``{algorithm, key_id, signature}`` strings; ArtifactError naming the field."""
    from edgeml.errors import ArtifactError
    from edgeml.runtime.manifest import parse_json

    obj = parse_json(raw, where)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: expected a JSON object {{algorithm, key_id, signature}}, got "
                            f"{type(obj).__name__}", hint="re-sign the artifact with edgeml")
    for key in _SIGNATURE_KEYS:
        value = obj.get(key)
        if not isinstance(value, str) or not value or len(value) > 4096:
            raise ArtifactError(f"{where} field '{key}': expected a non-empty string, got {value!r:.60}",
                                hint="re-sign the artifact with edgeml")
    return {k: obj[k] for k in _SIGNATURE_KEYS}


def verify_bytes(data: bytes, signature: dict, trusted_keys: list[Path]) -> str:
    """Verify ``signature`` over ``data`` with one of ``trusted_keys``; return the key id."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(signature, dict):
        raise SignatureError(f"a signature must be an object {{algorithm, key_id, signature}}, not "
                             f"{type(signature).__name__}")
    if signature.get("algorithm") != "ed25519":
        raise SignatureError(f"unsupported signature algorithm {signature.get('algorithm')!r}")
    keys = {key_id_of(k): k for k in (load_public_key(p) for p in trusted_keys)}
    key = keys.get(signature.get("key_id", ""))
    if key is None:
        raise SignatureError(
            f"signed by key {signature.get('key_id')!r}, which is not among the trusted keys "
            f"[{summarize_names(sorted(keys))}]",
            hint="add the signer's public key to the trusted keys, or sign with a trusted key",
        )
    try:
        key.verify(base64.b64decode(signature["signature"], validate=True), data)
    except (InvalidSignature, ValueError, KeyError, TypeError) as exc:
        raise SignatureError("signature does not match the signed content (tampered or wrong key)") from exc
    return signature["key_id"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_key_paths() -> list[Path]:  # pragma: no cover - convenience only
    return [Path(p) for p in os.environ.get("EDGEML_TRUSTED_KEYS", "").split(os.pathsep) if p]
