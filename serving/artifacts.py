"""The artifact format: a directory with ``manifest.json`` that lists every file by sha256.

``jobs`` writes artifacts with :func:`write_manifest`; ``serving`` (and ``framecast evaluate``)
reads them with :func:`load_artifact`, which refuses any directory whose files do not match
the manifest exactly: a changed byte, a missing file, or an unlisted extra file. Nothing here
unpickles anything and nothing imports TensorFlow.

The bytes that are loaded are the bytes that were hashed: :func:`load_artifact` reads every
file once into memory, hashes those bytes and keeps them (:meth:`LoadedArtifact.read_bytes`);
a runtime loads from them (LiteRT from ``model_content``, a SavedModel from
:meth:`LoadedArtifact.private_copy`, a copy written from the hashed bytes into a fresh 0700
temp dir). A file swapped on disk after the check is never read again, so there is no
check-then-reopen gap.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.exceptions import ArtifactError as ArtifactError  # re-exported

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
# Files the manifest never lists: itself. Everything else must be listed.
_UNLISTED_ALLOWED = frozenset({MANIFEST_NAME})
_CHUNK = 1 << 20

PruneSchedule = Literal["none", "polynomial", "constant", "2:4"]
QuantizationMode = Literal["none", "int8", "float16", "dynamic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputSpec(_Strict):
    """What the model takes: shape, dtype, and how pixels become model input."""

    shape: list[int] = Field(description="Model input shape, batch dimension first (-1 = any).")
    dtype: Literal["float32", "int8", "uint8", "float16"]
    scale: float | None = Field(default=None, description="Quantization scale of the input.")
    zero_point: int | None = Field(default=None, description="Quantization zero point.")
    normalization: str = Field(
        default="x / 255", description="How uint8 pixels are mapped to the float input range."
    )

    @field_validator("shape")
    @classmethod
    def _validate_shape(cls, shape: list[int]) -> list[int]:
        if len(shape) != 4 or any(d == 0 or d < -1 for d in shape):
            raise ValueError(f"input shape must be [batch, height, width, channels], got {shape}")
        return shape


class FileEntry(_Strict):
    """Checksum and size of one file of the artifact."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Optimization(_Strict):
    """Pruning and quantization applied to the model."""

    prune_schedule: PruneSchedule = "none"
    target_sparsity: float = Field(default=0.0, ge=0.0, le=1.0)
    measured_sparsity: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of zero weights over the prunable layers (kernels).",
    )
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    quantization: QuantizationMode = "none"
    qat: bool = False
    qat_epochs: int | None = Field(
        default=None, description="Quantization-aware fine-tune epochs (the int8 model only)."
    )
    calibration_sha256: str | None = Field(
        default=None, description="sha256 of the representative (calibration) set, int8 only."
    )
    calibration_samples: int | None = None


class Training(_Strict):
    """Lineage: what the model was trained on, how, and when."""

    dataset: str
    epochs: int = Field(ge=0, description="Epochs actually run.")
    epochs_requested: int | None = None
    workers: int = Field(ge=1)
    gpus_per_worker: float = 0.0
    seed: int
    limit: int | None = None
    started_at: datetime
    finished_at: datetime
    train_seconds: float | None = None
    early_stopped: bool = False
    resumed_from_epoch: int | None = Field(
        default=None, description="Epoch of the checkpoint training resumed from after a failure."
    )
    onednn: bool | None = Field(
        default=None, description="Whether the workers' TensorFlow ran its oneDNN CPU kernels."
    )
    recipe: dict[str, Any] | None = Field(
        default=None, description="How it was trained: the recipe's options and the teacher "
                                  "(jobs/train.py recipe_record); None in older manifests.")
    history: list[dict[str, float]] = Field(default_factory=list)


class ArtifactManifest(_Strict):
    """The manifest of an artifact directory (``manifest.json``)."""

    format_version: int = MANIFEST_FORMAT_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    model: str = Field(min_length=1, description="Model family: baseline_cnn, optimized_cnn, ...")
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    files: dict[str, FileEntry] = Field(default_factory=dict)
    primary: str = Field(
        default="model.tflite",
        description="The file (or directory, for a SavedModel) that serving runs by default.",
    )
    param_count: int | None = None
    macs: int | None = None
    optimization: Optimization = Field(default_factory=Optimization)
    training: Training
    metrics: dict[str, Any] = Field(default_factory=dict)


class LoadedArtifact(BaseModel):
    """A verified artifact: its directory, manifest, and the verified bytes of its files."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    directory: Path
    manifest: ArtifactManifest
    contents: dict[str, bytes] = Field(default_factory=dict, repr=False, exclude=True)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of a listed file as they were hashed at load (never re-read from disk)."""
        try:
            return self.contents[name]
        except KeyError:
            raise ArtifactError(
                f"{self.directory}: {name!r} is not part of this artifact"
            ) from None

    def private_copy(self, prefix: str) -> Path:
        """Write the verified files under ``prefix`` (a directory such as ``saved_model``) into
        a fresh private temp dir (mode 0700, files 0600); return the copy of ``prefix``.

        For runtimes that only load from a path: they read the hashed bytes, not the
        artifact directory, which may have changed since. The caller owns the temp dir.
        """
        prefix = prefix.rstrip("/") + "/"
        names = [n for n in self.contents if n.startswith(prefix)]
        if not names:
            raise ArtifactError(f"{self.directory}: no file under {prefix!r} in this artifact")
        root = Path(tempfile.mkdtemp(prefix="framecast-artifact-"))  # 0700
        for name in names:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.contents[name])
        return root / prefix.rstrip("/")

    def path(self, name: str) -> Path:
        """Absolute path of a listed file (or directory prefix such as ``saved_model``)."""
        if name not in self.manifest.files and not any(
            f.startswith(name.rstrip("/") + "/") for f in self.manifest.files
        ):
            raise ArtifactError(f"{self.directory}: {name!r} is not part of this artifact")
        return self.directory / name

    @property
    def tflite_path(self) -> Path | None:
        """The LiteRT model, when the artifact has one."""
        return self.directory / "model.tflite" if "model.tflite" in self.manifest.files else None

    @property
    def saved_model_path(self) -> Path | None:
        """The float SavedModel directory, when the artifact has one."""
        has = any(f.startswith("saved_model/") for f in self.manifest.files)
        return self.directory / "saved_model" if has else None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(directory: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_symlink():
            raise ArtifactError(f"{path}: symbolic links are not allowed in an artifact")
        if path.is_file():
            files[path.relative_to(directory).as_posix()] = path
    return files


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under directory except the manifest itself."""
    return {
        name: FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
        for name, path in _listed_files(directory).items()
        if name not in _UNLISTED_ALLOWED
    }


def write_manifest(directory: Path, manifest: ArtifactManifest) -> ArtifactManifest:
    """Checksum every file under directory into the manifest and write ``manifest.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory")
    final = manifest.model_copy(update={"files": file_entries(directory)})
    if final.primary not in final.files and not any(
        f.startswith(final.primary.rstrip("/") + "/") for f in final.files
    ):
        raise ArtifactError(f"{directory}: primary model file {final.primary!r} is missing")
    text = final.model_dump_json(indent=2) + "\n"
    (directory / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return final


def read_manifest(directory: Path) -> ArtifactManifest:
    """Parse and validate ``manifest.json`` without checking the files."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME} (not an artifact directory)")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> ArtifactManifest:
    """Parse and validate the bytes of a ``manifest.json`` (``where`` names it in errors)."""
    try:
        raw = json.loads(data.decode("utf-8"))
        return ArtifactManifest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{where}: not valid JSON: {error}") from error
    except ValidationError as error:
        raise ArtifactError(f"{where}: invalid manifest:\n{error}") from error


def _read_at_most(path: Path, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of a file, in one open (a file larger than its manifest
    entry is refused without reading it whole)."""
    with path.open("rb") as handle:
        return handle.read(limit + 1)


def verify_files(directory: Path, manifest: ArtifactManifest) -> dict[str, bytes]:
    """The verified bytes of every listed file; raise ArtifactError unless the files under
    directory are exactly the listed ones, each read once and hashed from memory."""
    present = {n: p for n, p in _listed_files(directory).items() if n not in _UNLISTED_ALLOWED}
    missing = sorted(set(manifest.files) - set(present))
    extra = sorted(set(present) - set(manifest.files))
    problems = [f"missing file {name!r}" for name in missing]
    problems += [f"unlisted file {name!r}" for name in extra]
    contents: dict[str, bytes] = {}
    for name, entry in sorted(manifest.files.items()):
        if name not in present:
            continue
        data = _read_at_most(present[name], entry.bytes)
        if len(data) != entry.bytes:
            size = present[name].stat().st_size if len(data) > entry.bytes else len(data)
            problems.append(f"{name!r} has {size} bytes, manifest says {entry.bytes}")
            continue
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256:
            problems.append(f"{name!r} sha256 {actual[:12]}... != manifest {entry.sha256[:12]}...")
            continue
        contents[name] = data
    if problems:
        raise ArtifactError(
            f"{directory}: artifact does not match its manifest, refusing to load: "
            + "; ".join(problems)
        )
    return contents


def load_artifact(directory: Path | str) -> LoadedArtifact:
    """Read the manifest and every file once, verify every checksum on the bytes read, and
    keep those bytes; raise ArtifactError on any mismatch."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact directory does not exist")
    manifest = read_manifest(directory)
    contents = verify_files(directory, manifest)
    return LoadedArtifact(directory=directory.resolve(), manifest=manifest, contents=contents)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a JSON document with a trailing newline (sorted keys, stable diffs)."""
    path.write_text(
        json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
