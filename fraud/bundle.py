"""The serving bundle: what training hands to serving, as one directory.

Layout (also what KServe's storage initializer lays out under /mnt/models):

    bundle.json              BundleManifest (below), JSON; `files` maps every other file to its SHA-256
    bundle.sig               optional: Ed25519 signature (base64) of the signed part of bundle.json
    model.ubj                XGBoost Booster in UBJSON
    reference_features.npy   float64 array [n, len(feature_names)]: reference sample for drift detection
    model_card.md            human-readable model card

The drift transformer runs in another Python environment and reads bundle.json and
reference_features.npy with the standard library and numpy only, so both stay plain formats.

Integrity (`verify_bundle`, run by the predictor before it loads anything): every file of the
directory is listed in `files` with its SHA-256 and nothing else is there; with a public key
configured, `bundle.sig` must be a valid Ed25519 signature of `signed_bytes(manifest)`: the
canonical JSON of the manifest without the three fields the model registry stamps at
registration (`model_name`, `model_version`, `mlflow_run_id`, bound by the registry itself), so the
signature made at training time covers the model, the reference sample, the thresholds, the
features and every file digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fraud import atomic
from fraud.settings import Settings, current

MANIFEST_FILE = "bundle.json"
MODEL_FILE = "model.ubj"
REFERENCE_FILE = "reference_features.npy"
MODEL_CARD_FILE = "model_card.md"
SIGNATURE_FILE = "bundle.sig"
BUNDLE_FORMAT_VERSION = 1
#: Manifest fields the model registry rewrites at registration: not covered by the signature.
REGISTRY_STAMPED_FIELDS = ("model_name", "model_version", "mlflow_run_id")
_HASH_CHUNK = 1 << 20
#: Files an MLflow model directory adds around the bundle when a version is registered
#: (fraud.registry): MLflow's own metadata, never read by the predictor or the drift transformer,
#: so not part of the bundle's digests. Everything else in the directory must be listed.
MLFLOW_MODEL_FILES = frozenset(
    {
        "MLmodel",
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
        "input_example.json",
        "serving_input_example.json",
    }
)

DECISIONS = ("approve", "review", "decline")


class BundleError(Exception):
    """A bundle directory is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class DecisionThresholds:
    """probability < review -> approve; review <= p < decline -> review; p >= decline -> decline."""

    review: float
    decline: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.review <= self.decline <= 1.0):
            raise BundleError(f"thresholds must satisfy 0 <= review <= decline <= 1, got {self}")

    def decide(self, probability: float) -> str:
        if probability >= self.decline:
            return "decline"
        if probability >= self.review:
            return "review"
        return "approve"


@dataclass(frozen=True)
class BundleManifest:
    model_name: str
    model_version: str
    feature_names: list[str]
    thresholds: DecisionThresholds
    #: feature name -> reason text shown to analysts
    reason_codes: dict[str, str]
    #: how many reason codes a response carries
    max_reason_codes: int = 3
    feature_service: str = ""
    created_at: str = ""
    training_window: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    #: features treated as categorical by the drift detector (chi-squared), by name
    categorical_features: list[str] = field(default_factory=list)
    mlflow_run_id: str = ""
    format_version: int = BUNDLE_FORMAT_VERSION
    #: file name -> SHA-256 (hex) of every file of the bundle except bundle.json and bundle.sig
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleManifest:
        try:
            data = dict(data)
            data["thresholds"] = DecisionThresholds(**data["thresholds"])
            manifest = cls(**data)
            if not isinstance(manifest.files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in manifest.files.items()
            ):
                raise ValueError("files must map file names to SHA-256 hex digests")
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{MANIFEST_FILE} is invalid: {exc}") from None
        if manifest.format_version != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"{MANIFEST_FILE} has format_version {manifest.format_version}, expected {BUNDLE_FORMAT_VERSION}"
            )
        if not manifest.feature_names:
            raise BundleError(f"{MANIFEST_FILE} lists no feature_names")
        return manifest


def read_manifest(bundle_dir: Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_FILE} in {bundle_dir}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    return BundleManifest.from_dict(data)


def validate_bundle(bundle_dir: Path) -> BundleManifest:
    """Check that every file of the bundle exists and matches the digest bundle.json lists for it;
    return its manifest. Raises BundleError."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    manifest = read_manifest(bundle_dir)
    for name in (MODEL_FILE, REFERENCE_FILE, MODEL_CARD_FILE):
        if not (bundle_dir / name).is_file():
            raise BundleError(f"bundle {bundle_dir} has no {name}")
    if manifest.files:
        _check_digests(bundle_dir, manifest)
    return manifest


# --- integrity: digests and signature ---------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_digests(bundle_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a bundle directory except bundle.json, bundle.sig and MLflow's
    model metadata (`MLFLOW_MODEL_FILES`).

    Subdirectories are not part of the bundle format: their presence is an error."""
    bundle_dir = Path(bundle_dir)
    digests: dict[str, str] = {}
    for path in sorted(bundle_dir.iterdir()):
        if path.name in (MANIFEST_FILE, SIGNATURE_FILE) or path.name in MLFLOW_MODEL_FILES:
            continue
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"bundle {bundle_dir} holds {path.name!r}, which is not a regular file")
        digests[path.name] = file_sha256(path)
    return digests


def _check_digests(bundle_dir: Path, manifest: BundleManifest) -> None:
    actual = bundle_digests(bundle_dir)
    listed = manifest.files
    added = sorted(set(actual) - set(listed))
    removed = sorted(set(listed) - set(actual))
    changed = sorted(name for name in set(actual) & set(listed) if actual[name] != listed[name])
    problems = []
    if changed:
        problems.append(f"changed: {', '.join(changed)}")
    if added:
        problems.append(f"not listed in {MANIFEST_FILE}: {', '.join(added)}")
    if removed:
        problems.append(f"missing: {', '.join(removed)}")
    if problems:
        raise BundleError(f"bundle {bundle_dir} does not match its {MANIFEST_FILE} digests ({'; '.join(problems)})")


def signed_bytes(manifest: BundleManifest) -> bytes:
    """What the signature covers: the manifest as sorted, compact JSON without the fields the
    registry stamps (REGISTRY_STAMPED_FIELDS)."""
    data = asdict(manifest)
    for name in REGISTRY_STAMPED_FIELDS:
        data.pop(name, None)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


#: Environment variables naming the PEM files of the bundle keys (read at entry points only).
SIGNING_KEY_ENV = "FRAUD_BUNDLE_SIGNING_KEY"
PUBLIC_KEY_ENV = "FRAUD_BUNDLE_PUBLIC_KEY"


def signing_key_from_env(settings: Settings | None = None) -> Ed25519PrivateKey | None:
    """The private key named by the setting `bundle_signing_key` (FRAUD_BUNDLE_SIGNING_KEY), or None."""
    path = (settings or current()).bundle_signing_key
    return load_private_key(Path(path)) if path else None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (PKCS#8, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read the bundle signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"bundle signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read the bundle public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"bundle public key {path} is not an Ed25519 key")
    return key


def generate_key_pair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair as PEM files (the private one readable by its owner only)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    Path(public_path).write_bytes(public_pem)


def sign_bundle(bundle_dir: Path, private_key: Ed25519PrivateKey) -> Path:
    """Write bundle.sig for the bundle's current manifest (whose digests must match its files)."""
    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    if not manifest.files:
        raise BundleError(f"{MANIFEST_FILE} of {bundle_dir} lists no file digests: nothing to sign")
    signature = private_key.sign(signed_bytes(manifest))
    path = bundle_dir / SIGNATURE_FILE
    path.write_text(base64.b64encode(signature).decode() + "\n")
    return path


def verify_bundle(bundle_dir: Path, public_key: Ed25519PublicKey | None = None) -> BundleManifest:
    """The predictor's check before loading: bundle.json lists digests, every file matches them,
    no file is added or missing, and with `public_key` bundle.sig is its valid signature.
    Raises BundleError naming what does not match."""
    bundle_dir = Path(bundle_dir)
    manifest = validate_bundle(bundle_dir)
    if not manifest.files:
        raise BundleError(f"{MANIFEST_FILE} of {bundle_dir} lists no file digests: the bundle cannot be verified")
    if public_key is None:
        return manifest
    signature_path = bundle_dir / SIGNATURE_FILE
    if not signature_path.is_file():
        raise BundleError(f"bundle {bundle_dir} has no {SIGNATURE_FILE} but a bundle public key is configured")
    try:
        signature = base64.b64decode(signature_path.read_text().strip(), validate=True)
        public_key.verify(signature, signed_bytes(manifest))
    except (InvalidSignature, ValueError) as exc:
        raise BundleError(
            f"bundle {bundle_dir}: {SIGNATURE_FILE} is not a valid signature of its {MANIFEST_FILE} "
            f"({type(exc).__name__})"
        ) from None
    return manifest


def write_bundle_atomically(staging_dir: Path, final_dir: Path) -> Path:
    """Move a completely written staging directory into place; never leaves a half bundle at final_dir."""
    validate_bundle(staging_dir)
    return atomic.replace_dir(staging_dir, final_dir)


def write_bundle(
    bundle_dir: Path,
    booster: Any,
    manifest: BundleManifest,
    reference_features: Any,
    model_card: str,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write a complete bundle to `bundle_dir` atomically (staged next to it, then renamed), with
    the SHA-256 of every file in bundle.json and, given `signing_key`, its signature in bundle.sig.

    `booster` is an xgboost.Booster; `reference_features` a 2-D float array whose columns follow
    `manifest.feature_names`.
    """
    import numpy as np

    reference = np.asarray(reference_features, dtype="float64")
    if reference.ndim != 2 or reference.shape[1] != len(manifest.feature_names):
        raise BundleError(
            f"reference sample must have shape [n, {len(manifest.feature_names)}], got {list(reference.shape)}"
        )
    if list(booster.feature_names or []) not in ([], list(manifest.feature_names)):
        raise BundleError("booster feature names differ from the manifest's feature_names")
    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}-", dir=bundle_dir.parent))
    try:
        booster.save_model(str(staging / MODEL_FILE))
        np.save(staging / REFERENCE_FILE, reference, allow_pickle=False)
        (staging / MODEL_CARD_FILE).write_text(model_card)
        (staging / MANIFEST_FILE).write_text(replace(manifest, files=bundle_digests(staging)).to_json())
        if signing_key is not None:
            sign_bundle(staging, signing_key)
        return write_bundle_atomically(staging, bundle_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


#: Files of a thresholds folder (the keys of the `fraud-decision-thresholds` ConfigMap).
THRESHOLD_FILES = ("review", "decline")


def read_threshold_overrides(folder: Path) -> DecisionThresholds | None:
    """Decision thresholds an operator set without retraining: a folder holding the files `review`
    and `decline`, each one probability (a mounted ConfigMap). None when the folder does not exist;
    BundleError when it is incomplete or invalid, so a typo never silently keeps the old cut-offs."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    values: dict[str, float] = {}
    for name in THRESHOLD_FILES:
        path = folder / name
        if not path.is_file():
            needed = " and ".join(THRESHOLD_FILES)
            raise BundleError(f"thresholds folder {folder} has no {name!r} file (needs {needed})")
        text = path.read_text().strip()
        try:
            values[name] = float(text)
        except ValueError:
            raise BundleError(f"{path}: {text!r} is not a probability") from None
    return DecisionThresholds(**values)
