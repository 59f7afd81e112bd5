"""Artifacts named by URI (``s3://``, ``gs://``, ``file://``), through ``pyarrow.fs``.

A location is a plain directory (as before) or a URI. ``file://`` URIs are plain local
directories. For object stores (``s3://``, ``gs://``):

- :func:`verify_remote` is what the driver and the app builder do before anything is sent:
  it lists the prefix, reads ``manifest.json`` and streams every listed object through
  sha256 without writing it anywhere (the driver never needs the files locally). An object
  that differs from its manifest entry, a missing one or an unlisted extra one is refused,
  named, exactly as :func:`serving.artifacts.verify_files` refuses a local directory.
- :func:`fetch` is what each replica does: it downloads the artifact into a local cache
  directory keyed by the URI and the sha256 of the manifest it read (so a new artifact at
  the same URI gets a new entry), hashing every object as it is written and refusing a
  mismatch before anything is kept; a cached copy is reused only when it still verifies
  (otherwise it is removed and fetched again). The model is then loaded from the cache by
  :func:`serving.artifacts.load_artifact`, which hashes the bytes it loads, as for any
  local directory.

Credentials come from :class:`serving.config.StorageSettings` (SecretStr, from
``FRAMECAST_STORAGE_*`` or the AWS variables), never from a URI: a URI with a user/password
part or query options is refused, so no secret ends up on a command line, in ``serve
status`` (the URI is in the replicas' user_config) or in a log line. Nothing here imports
TensorFlow.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from serving.artifacts import (
    MANIFEST_NAME,
    ArtifactError,
    ArtifactManifest,
    LoadedArtifact,
    load_artifact,
    parse_manifest,
)
from serving.config import StorageSettings

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "file")
_ALIASES = {"s3": "s3", "gs": "gs", "gcs": "gs", "file": "file"}
_CHUNK = 1 << 20
# A manifest lists files and lineage: kilobytes. Anything far larger is not one.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class StorageError(ArtifactError):
    """An artifact URI is malformed, unsupported, or its store could not be read/written."""


@dataclass(frozen=True)
class ArtifactURI:
    """A validated object-store location: ``scheme://bucket/prefix`` (no credentials)."""

    scheme: str  # "s3" | "gs"
    bucket: str
    prefix: str  # no leading or trailing "/"; "" = the bucket's root

    @property
    def root(self) -> str:
        """The path pyarrow.fs takes: ``bucket/prefix``."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.root}/"


def is_uri(location: str | Path) -> bool:
    """True when ``location`` names a scheme (``x://``) rather than a plain path."""
    text = str(location)
    head, sep, _ = text.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


def _shown(text: str) -> str:
    """A location as it may be printed: a URI's user/password and query left out (either
    may hold a secret)."""
    parts = urlsplit(text)
    if parts.username is None and parts.password is None and not parts.query:
        return text
    user = "***@" if parts.username is not None or parts.password is not None else ""
    query = "?***" if parts.query else ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{parts.path}{query}"


def parse_location(location: str | Path, field: str = "artifact") -> str | ArtifactURI:
    """A plain directory path (``file://`` URIs become one) or a validated object-store URI.

    Raise :class:`StorageError` naming ``field`` for an unsupported scheme, credentials or
    options in the URI, or a URI without a bucket.
    """
    text = str(location)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    scheme = _ALIASES.get(parts.scheme.lower())
    where = f"{field} {_shown(text)}"
    if scheme is None:
        raise StorageError(
            f"{where}: unsupported scheme {parts.scheme!r} "
            "(s3://, gs://, file:// or a plain directory)"
        )
    if parts.username is not None or parts.password is not None:
        raise StorageError(
            f"{where}: credentials do not go in the URI; use the storage settings "
            "(FRAMECAST_STORAGE_ACCESS_KEY/SECRET_KEY or the AWS variables)"
        )
    if parts.query or parts.fragment:
        raise StorageError(
            f"{where}: options do not go in the URI (?...); use the storage settings "
            "(FRAMECAST_STORAGE_*)"
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{where}: file:// URIs name a local path (file:///abs/path)")
        return unquote(parts.path) or "/"
    bucket = parts.netloc
    if not bucket:
        raise StorageError(f"{where}: no bucket ({scheme}://BUCKET/PATH/)")
    prefix = unquote(parts.path).strip("/")
    if prefix and not _safe_name(prefix):
        raise StorageError(f"{where}: the path may not hold empty, '.' or '..' parts")
    return ArtifactURI(scheme=scheme, bucket=bucket, prefix=prefix)


def _safe_name(name: str) -> bool:
    """A relative name with no empty, '.' or '..' part (nothing written outside the cache)."""
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in name.split("/"))


def _s3_endpoint(endpoint: str) -> tuple[str | None, str]:
    """(scheme, host[:port]) of an endpoint override given with or without its scheme."""
    if "://" in endpoint:
        scheme, _, rest = endpoint.partition("://")
        return scheme.lower(), rest.rstrip("/")
    return None, endpoint.rstrip("/")


def filesystem(uri: ArtifactURI, storage: StorageSettings) -> pafs.FileSystem:
    """The pyarrow filesystem for ``uri``, configured from the storage settings."""
    import pyarrow.fs as pafs

    try:
        if uri.scheme == "gs":
            return pafs.GcsFileSystem(anonymous=storage.gcs_anonymous)
        options: dict[str, object] = {}
        if storage.access_key is not None and storage.secret_key is not None:
            options["access_key"] = storage.access_key.get_secret_value()
            options["secret_key"] = storage.secret_key.get_secret_value()
            if storage.session_token is not None:
                options["session_token"] = storage.session_token.get_secret_value()
        if storage.endpoint_override:
            scheme, host = _s3_endpoint(storage.endpoint_override)
            options["endpoint_override"] = host
            if scheme is not None:
                options["scheme"] = scheme
        region = storage.region
        if region is None and not storage.endpoint_override:
            try:  # the bucket's own region, so that requests are not redirected
                region = pafs.resolve_s3_region(uri.bucket)
            except OSError:
                region = None  # the SDK's default chain decides
        if region is not None:
            options["region"] = region
        return pafs.S3FileSystem(**options)
    except (OSError, ValueError) as error:
        raise StorageError(f"{uri}: cannot open the object store: {error}") from None


def _remote_files(fs: pafs.FileSystem, uri: ArtifactURI) -> dict[str, int]:
    """Size of every object under the URI's prefix, by its name relative to the prefix."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(uri.root, recursive=True))
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such artifact (nothing under this prefix)") from None
    except OSError as error:
        raise StorageError(f"{uri}: cannot list the artifact: {error}") from None
    files: dict[str, int] = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue  # "directories" are prefixes (or zero-byte markers) in object stores
        name = info.path[len(uri.root):].lstrip("/")
        files[name] = int(info.size or 0)
    if not files:
        raise StorageError(f"{uri}: no such artifact (nothing under this prefix)")
    return files


def _read_manifest(fs: pafs.FileSystem, uri: ArtifactURI, size: int | None
                   ) -> tuple[ArtifactManifest, bytes]:
    if size is None:
        raise ArtifactError(f"{uri}: no {MANIFEST_NAME} (not an artifact)")
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{uri}: {MANIFEST_NAME} has {size} bytes, more than a manifest")
    try:
        with fs.open_input_stream(f"{uri.root}/{MANIFEST_NAME}") as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise StorageError(f"{uri}: cannot read {MANIFEST_NAME}: {error}") from None
    return parse_manifest(data, f"{uri}{MANIFEST_NAME}"), bytes(data)


def _copy_hashed(fs: pafs.FileSystem, uri: ArtifactURI, name: str, expected: int,
                 sink: Path | None) -> tuple[int, str]:
    """Stream one object through sha256 (into ``sink`` when given, mode 0600): its
    (size, hex digest), reading at most one byte past the expected size."""
    digest = hashlib.sha256()
    size = 0
    handle = None
    try:
        if sink is not None:
            sink.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = os.fdopen(os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        with fs.open_input_stream(f"{uri.root}/{name}") as stream:
            while size <= expected:
                chunk = stream.read(min(_CHUNK, expected + 1 - size))
                if not chunk:
                    break
                size += len(chunk)
                digest.update(chunk)
                if handle is not None:
                    handle.write(chunk)
    except OSError as error:
        raise StorageError(f"{uri}: cannot read {name!r}: {error}") from None
    finally:
        if handle is not None:
            handle.close()
    return size, digest.hexdigest()


def _check_objects(fs: pafs.FileSystem, uri: ArtifactURI, staging: Path | None
                   ) -> tuple[ArtifactManifest, bytes]:
    """List, read the manifest, and hash every listed object (copying it under ``staging``
    when given); raise ArtifactError naming every object that does not match."""
    present = _remote_files(fs, uri)
    manifest, manifest_bytes = _read_manifest(fs, uri, present.pop(MANIFEST_NAME, None))
    unsafe = sorted(n for n in {*present, *manifest.files} if not _safe_name(n))
    if unsafe:
        raise ArtifactError(f"{uri}: refusing unsafe file names {unsafe}")
    problems = [f"missing file {name!r}" for name in sorted(set(manifest.files) - set(present))]
    problems += [f"unlisted file {name!r}" for name in sorted(set(present) - set(manifest.files))]
    for name, entry in sorted(manifest.files.items()):
        if name not in present:
            continue
        if present[name] != entry.bytes:
            problems.append(f"{name!r} has {present[name]} bytes, manifest says {entry.bytes}")
            continue
        sink = staging / name if staging is not None else None
        size, actual = _copy_hashed(fs, uri, name, entry.bytes, sink)
        if size != entry.bytes:
            problems.append(f"{name!r} read {size} bytes, manifest says {entry.bytes}")
        elif actual != entry.sha256:
            problems.append(f"{name!r} sha256 {actual[:12]}... != manifest {entry.sha256[:12]}...")
    if problems:
        raise ArtifactError(
            f"{uri}: artifact does not match its manifest, refusing to load: "
            + "; ".join(problems)
        )
    return manifest, manifest_bytes


def verify_remote(uri: ArtifactURI, storage: StorageSettings) -> ArtifactManifest:
    """Verify an object-store artifact without keeping any of it: every object's size and
    sha256 against its manifest, no missing or unlisted object."""
    manifest, _ = _check_objects(filesystem(uri, storage), uri, staging=None)
    return manifest


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/framecast/artifacts`` (``~/.cache/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "framecast" / "artifacts"


def cache_key(uri: ArtifactURI, manifest_bytes: bytes) -> str:
    """The cache entry of an artifact: sha256 of its URI and of the manifest read there."""
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    return hashlib.sha256(f"{uri}\n{manifest_sha}".encode()).hexdigest()[:40]


def _cached(entry: Path, manifest_bytes: bytes) -> LoadedArtifact | None:
    """The verified cached copy, or None (a copy that no longer verifies is removed)."""
    if not entry.is_dir():
        return None
    try:
        if (entry / MANIFEST_NAME).read_bytes() != manifest_bytes:
            raise ArtifactError(f"{entry}: {MANIFEST_NAME} is not the one fetched")
        return load_artifact(entry)
    except (ArtifactError, OSError) as error:
        log.warning("cached artifact %s no longer verifies, fetching again: %s", entry, error)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def fetch(uri: ArtifactURI, storage: StorageSettings) -> LoadedArtifact:
    """The artifact at ``uri``, loaded from this node's cache (fetched and verified first
    when not cached, or when the cached copy no longer verifies)."""
    fs = filesystem(uri, storage)
    cache = Path(storage.cache_dir) if storage.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    present = _remote_files(fs, uri)
    _, manifest_bytes = _read_manifest(fs, uri, present.get(MANIFEST_NAME))
    entry = cache / cache_key(uri, manifest_bytes)
    loaded = _cached(entry, manifest_bytes)
    if loaded is not None:
        log.info("artifact %s: cached copy %s verified, reused", uri, entry)
        return loaded
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))  # 0700
    try:
        _, fetched_manifest = _check_objects(fs, uri, staging)
        if fetched_manifest != manifest_bytes:
            raise ArtifactError(f"{uri}: {MANIFEST_NAME} changed while fetching; try again")
        (staging / MANIFEST_NAME).write_bytes(fetched_manifest)
        try:
            staging.rename(entry)
        except OSError:  # another replica on this node cached it first: use theirs
            if _cached(entry, manifest_bytes) is None:
                raise
        log.info("artifact %s fetched into %s", uri, entry)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return load_artifact(entry)  # the bytes served are hashed again as they are loaded


def load_location(location: str, storage: StorageSettings | None = None) -> LoadedArtifact:
    """A verified artifact from a directory, a ``file://`` URI, or an object store (via the
    local cache)."""
    parsed = parse_location(location)
    if isinstance(parsed, str):
        return load_artifact(parsed)
    return fetch(parsed, storage or StorageSettings())


def verify_location(location: str, storage: StorageSettings | None = None) -> ArtifactManifest:
    """Verify an artifact where it is, keeping nothing: a directory is read and hashed, an
    object store's objects are streamed through sha256."""
    parsed = parse_location(location)
    if isinstance(parsed, str):
        return load_artifact(parsed).manifest
    return verify_remote(parsed, storage or StorageSettings())


def _writable(fs: pafs.FileSystem, uri: ArtifactURI) -> dict[str, int]:
    """The objects an upload to ``uri`` replaces: none, or an artifact's; raise
    StorageError when the prefix holds anything else (or cannot be listed)."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(uri.root, recursive=True,
                                                   allow_not_found=True))
    except OSError as error:
        raise StorageError(f"--out {uri}: cannot list the prefix: {error}") from None
    existing = {
        info.path[len(uri.root):].lstrip("/"): int(info.size or 0)
        for info in infos if info.type == pafs.FileType.File
    }
    if existing and MANIFEST_NAME not in existing:
        raise StorageError(
            f"--out {uri}: the prefix holds objects and no {MANIFEST_NAME}; "
            "refusing to overwrite it"
        )
    return existing


def check_out(location: str, storage: StorageSettings | None = None) -> None:
    """Before any work: ``--out`` can take an artifact (the store answers with these
    credentials; the prefix is empty or holds an artifact)."""
    parsed = parse_location(location, field="--out")
    if not isinstance(parsed, str):
        _writable(filesystem(parsed, storage or StorageSettings()), parsed)


def upload(directory: Path, location: str, storage: StorageSettings | None = None) -> str:
    """Copy a verified local artifact to an object store (the manifest last, so a reader
    never finds a manifest before its files); return the URI written.

    The prefix must be empty or hold an artifact (it is replaced); anything else is refused.
    """
    parsed = parse_location(location, field="--out")
    if isinstance(parsed, str):
        raise StorageError(f"--out {location}: not an object-store URI")
    artifact = load_artifact(directory)  # never upload what does not verify
    fs = filesystem(parsed, storage or StorageSettings())
    existing = _writable(fs, parsed)
    try:
        for name in sorted(existing, key=lambda n: n != MANIFEST_NAME):  # manifest first
            fs.delete_file(f"{parsed.root}/{name}")
        for name in [*sorted(artifact.manifest.files), MANIFEST_NAME]:
            data = (Path(directory) / MANIFEST_NAME).read_bytes() if name == MANIFEST_NAME \
                else artifact.read_bytes(name)
            with fs.open_output_stream(f"{parsed.root}/{name}") as stream:
                stream.write(data)
    except OSError as error:
        raise StorageError(f"--out {parsed}: upload failed: {error}") from None
    return str(parsed)


__all__ = [
    "SCHEMES",
    "ArtifactURI",
    "StorageError",
    "cache_key",
    "check_out",
    "default_cache_dir",
    "fetch",
    "filesystem",
    "is_uri",
    "load_location",
    "parse_location",
    "upload",
    "verify_location",
    "verify_remote",
]
