"""Write and load complex bundles: ``manifest.json`` + ``vertices.safetensors``, never pickle.

Writing is atomic: the bundle is assembled in a temporary directory beside the target and
renamed into place, so a reader sees either no bundle or a whole one. Loading checks the
schema version, validates the manifest, refuses files outside the bundle directory, checks
every file's sha256 and the exact set of tensor names before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from safetensors import SafetensorError

from serving.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TENSORS_FILE,
    Manifest,
    buffer_key,
    describe_validation_error,
    draw_buffer_key,
    vertex_key,
)

if TYPE_CHECKING:
    import torch

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_FILE_BYTES = 16 * 2**30
"""The default size limit of any other file of a bundle (its weights)."""


class BundleError(ValueError):
    """A bundle that cannot be written or must not be loaded; the message names the problem."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle held in memory."""

    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    digest: str
    """sha256 of ``manifest.json``, which pins every other file through its hashes."""

    def vertices(self, simplex: int) -> list[dict[str, torch.Tensor]]:
        """The parameters of every vertex of one simplex."""
        spec = self.manifest.simplexes[simplex]
        return [
            {n: self.tensors[vertex_key(simplex, j, n)] for n in self.manifest.parameter_names}
            for j in range(spec.num_vertices)
        ]

    def buffers(self, simplex: int, draw: int) -> dict[str, torch.Tensor]:
        """The buffers of one member: its mode's, with its own BatchNorm statistics if any."""
        manifest = self.manifest
        buffers = {n: self.tensors[buffer_key(simplex, n)] for n in manifest.buffer_names}
        if manifest.simplexes[simplex].draws[draw].batchnorm:
            for n in manifest.batchnorm_buffer_names:
                buffers[n] = self.tensors[draw_buffer_key(simplex, draw, n)]
        return buffers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bundle(
    path: str | Path,
    manifest: Manifest,
    tensors: dict[str, torch.Tensor],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle atomically and return its path.

    The tensor names must be exactly ``manifest.tensor_keys()``; ``manifest.files`` is filled
    in here. An existing bundle is replaced only with ``overwrite=True``.
    """
    from safetensors.torch import save_file  # torch: imported where tensors are written

    path = Path(path)
    try:  # model_copy(update=...) skips validation: check what is about to be written
        manifest = Manifest.model_validate(manifest.model_dump())
    except ValidationError as err:
        raise BundleError(f"the manifest is invalid: {describe_validation_error(err)}") from None
    expected = manifest.tensor_keys()
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise BundleError(f"tensors do not match the manifest: missing {missing}, extra {extra}")
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, staging / TENSORS_FILE, metadata={"format": "pt"})
        files = {TENSORS_FILE: sha256_file(staging / TENSORS_FILE)}
        final = manifest.model_copy(update={"files": files})
        text = json.dumps(final.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
        _fsync_write(staging / MANIFEST_FILE, text.encode())
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, retired / path.name)
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(retired / path.name, path)  # put the old bundle back
                raise
            finally:
                shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _inside(root: Path, name: str) -> Path:
    """Resolve a file named by the manifest, refusing anything outside the bundle directory."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise BundleError(f"manifest names a file outside the bundle: {name!r}")
    file = root / name
    if file.is_symlink():
        raise BundleError(f"{name} is a symbolic link; bundles hold plain files only")
    if not file.is_file():
        raise BundleError(f"{name} is missing from {root}")
    return file


def read_manifest(path: str | Path) -> tuple[Manifest, str]:
    """Parse and validate ``manifest.json``; return it with its sha256."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    file = _inside(root, MANIFEST_FILE)
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
    raw = file.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{MANIFEST_FILE} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BundleError(f"{MANIFEST_FILE} has no schema_version; is this an espro bundle?")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"unsupported bundle schema version {data['schema_version']!r}: "
            f"this espro reads version {SCHEMA_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise BundleError(f"{MANIFEST_FILE} is invalid: {describe_validation_error(err)}") from None
    return manifest, hashlib.sha256(raw).hexdigest()


def load_bundle(path: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> Bundle:
    """Load a bundle after verifying its schema, file sizes, file hashes and tensor names.

    A file the manifest lists that is larger than ``max_file_bytes`` is refused before it is
    read (files are read whole, to hash the very bytes that are parsed)."""
    from safetensors.torch import load  # torch: imported where tensors are read

    root = Path(path)
    manifest, digest = read_manifest(root)
    if TENSORS_FILE not in manifest.files:
        raise BundleError(f"manifest lists no hash for {TENSORS_FILE}")
    contents = {}
    for name, expected in manifest.files.items():
        file = _inside(root, name)
        if (size := file.stat().st_size) > max_file_bytes:
            raise BundleError(f"{name} has {size} bytes; the limit is {max_file_bytes}")
        # Hash the very bytes that are parsed, so the file cannot change in between.
        contents[name] = file.read_bytes()
        actual = hashlib.sha256(contents[name]).hexdigest()
        if actual != expected:
            raise BundleError(
                f"sha256 mismatch for {name}: manifest says {expected}, file has {actual}"
            )
    try:
        tensors = load(contents[TENSORS_FILE])
    except SafetensorError as err:
        raise BundleError(f"{TENSORS_FILE} cannot be read: {err}") from None
    expected_keys = manifest.tensor_keys()
    if set(tensors) != expected_keys:
        missing = sorted(expected_keys - set(tensors))[:5]
        extra = sorted(set(tensors) - expected_keys)[:5]
        raise BundleError(
            f"{TENSORS_FILE} does not match the manifest: missing {missing}, unexpected {extra}"
        )
    return Bundle(path=root, manifest=manifest, tensors=tensors, digest=digest)
