"""Write and load complex bundles: ``manifest.json`` + ``vertices.safetensors``, never pickle.

Writing is atomic: the bundle is assembled in a temporary directory beside the target and
renamed into place, so a reader sees either no bundle or a whole one. Loading checks the
schema version, validates the manifest, refuses anything but plain files of the bundle
directory, checks the tensor file's size against its header before reading it, then every
file's sha256, the exact set of tensor names and that every number is finite, before anything
is used. Writing refuses what loading would. Every refusal is a
:class:`~serving.errors.BundleError` whose message starts with the bundle's path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError
from safetensors import SafetensorError

from serving.errors import BundleError, describe_validation_error
from serving.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TENSORS_FILE,
    Manifest,
    buffer_key,
    draw_buffer_key,
    vertex_key,
)

if TYPE_CHECKING:
    import torch

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_MANIFEST_DEPTH = 32
"""How deeply lists and objects may nest in the manifest, so that no reader of it (pydantic,
a JSON encoder) recurses past Python's limit."""
MAX_FILE_BYTES = 16 * 2**30
"""The default size limit of any other file of a bundle (its weights)."""
MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header, as the safetensors library limits it."""


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


def _check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a NaN or infinity in any floating tensor: it would answer NaN to every request."""
    import torch

    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(f"{source}: tensor {key} holds NaN or infinite values")


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
        message = describe_validation_error(err)
        raise BundleError(f"{path}: the manifest is invalid: {message}") from None
    expected = manifest.tensor_keys()
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise BundleError(
            f"{path}: tensors do not match the manifest: missing {missing}, extra {extra}"
        )
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _check_finite(contiguous, str(path))
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(contiguous, staging / TENSORS_FILE, metadata={"format": "pt"})
        files = {TENSORS_FILE: sha256_file(staging / TENSORS_FILE)}
        final = manifest.model_copy(update={"files": files})
        _fsync_write(staging / MANIFEST_FILE, _manifest_json(final, path).encode())
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


def _manifest_json(manifest: Manifest, path: Path) -> str:
    """The text of ``manifest.json``: strict JSON, so a NaN or infinity anywhere is refused."""
    try:
        data = manifest.model_dump(mode="json")
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (ValueError, RecursionError) as err:
        raise BundleError(f"{path}: the manifest cannot be written as JSON: {err}") from None


def _inside(root: Path, name: str) -> tuple[Path, os.stat_result]:
    """A file named by the manifest and its status, refusing anything but a plain file of the
    bundle directory: a symbolic or hard link could make one file stand for another."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise BundleError(f"{root}: the manifest names a file outside the bundle: {name!r}")
    file = root / name
    try:
        status = file.lstat()
    except FileNotFoundError:
        raise BundleError(f"{root}: {name} is missing") from None
    except OSError as err:
        raise BundleError(f"{root}: {name} cannot be read: {err.strerror}") from None
    if stat.S_ISLNK(status.st_mode):
        raise BundleError(f"{root}: {name} is a symbolic link; bundles hold plain files only")
    if not stat.S_ISREG(status.st_mode):
        raise BundleError(f"{root}: {name} is not a plain file")
    if status.st_nlink > 1:
        raise BundleError(
            f"{root}: {name} is a hard link ({status.st_nlink} names); "
            "bundles hold plain files only"
        )
    return file, status


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in parsed JSON, counted level by level (no recursion)."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
    return depth


def _finite_float(text: str) -> float:
    """A JSON number as a float; one past float64's range (``1e999``) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(raw: bytes, name: str, root: str | Path) -> Any:
    """Strict JSON (no NaN or Infinity), nested at most ``MAX_MANIFEST_DEPTH`` deep."""
    try:
        data = json.loads(raw, parse_float=_finite_float, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueError
        raise BundleError(f"{root}: {name} is not valid JSON: {err}") from None
    if _depth(data) > MAX_MANIFEST_DEPTH:
        raise BundleError(f"{root}: {name} nests deeper than {MAX_MANIFEST_DEPTH} levels")
    return data


def read_manifest(path: str | Path) -> tuple[Manifest, str]:
    """Parse and validate ``manifest.json``; return it with its sha256."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    file, status = _inside(root, MANIFEST_FILE)
    if status.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{root}: {MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise BundleError(f"{root}: {MANIFEST_FILE} cannot be read: {err}") from None
    return parse_manifest(raw, root), hashlib.sha256(raw).hexdigest()


def parse_manifest(raw: bytes, source: str | Path) -> Manifest:
    """Validate the bytes of ``manifest.json``, from a bundle directory or a bundle URL named
    by ``source`` in every refusal."""
    data = _parse_json(raw, MANIFEST_FILE, source)
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BundleError(
            f"{source}: {MANIFEST_FILE} has no schema_version; is this an espro bundle?"
        )
    if data["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"{source}: unsupported bundle schema version {data['schema_version']!r}: "
            f"this espro reads version {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        message = describe_validation_error(err)
        raise BundleError(f"{source}: {MANIFEST_FILE} is invalid: {message}") from None


def _safetensors_size(header: bytes) -> int:
    """The byte length a safetensors file with this JSON header must have."""
    try:
        entries = json.loads(header)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"its header is not valid JSON: {err}") from None
    if not isinstance(entries, dict):
        raise ValueError("its header is not a JSON object")
    end = 0
    for key, entry in entries.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise ValueError(f"tensor {key!r} has no valid data_offsets in the header")
        end = max(end, offsets[1])
    return 8 + len(header) + end


def _read_tensor_file(file: Path, size: int) -> bytes:
    """The whole tensor file, read only once its header accounts for exactly ``size`` bytes,
    so a padded, truncated or sparse file is refused after reading its header alone."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"its header length {length} does not fit a file of {size} bytes")
        expected = _safetensors_size(f.read(length))
        if expected != size:
            raise ValueError(f"it has {size} bytes; its header accounts for {expected}")
        f.seek(0)
        data = f.read()
    if len(data) != size:
        raise ValueError("it changed while it was read")
    return data


def load_bundle(path: str | Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> Bundle:
    """Load a bundle after verifying its schema, file sizes, file hashes, tensor names and
    that every tensor is finite.

    A file the manifest lists that is larger than ``max_file_bytes`` is refused before it is
    read; the tensor file is read whole, to hash the very bytes that are parsed."""
    from safetensors.torch import load  # torch: imported where tensors are read

    root = Path(path)
    manifest, digest = read_manifest(root)
    if TENSORS_FILE not in manifest.files:
        raise BundleError(f"{root}: the manifest lists no hash for {TENSORS_FILE}")
    data = b""
    for name, expected in manifest.files.items():
        file, status = _inside(root, name)
        if (size := status.st_size) > max_file_bytes:
            raise BundleError(f"{root}: {name} has {size} bytes; the limit is {max_file_bytes}")
        try:
            if name == TENSORS_FILE:  # hash the very bytes that are parsed
                data = _read_tensor_file(file, size)
                actual = hashlib.sha256(data).hexdigest()
            else:
                actual = sha256_file(file)
        except (OSError, ValueError) as err:
            raise BundleError(f"{root}: {name} cannot be read: {err}") from None
        if actual != expected:
            raise BundleError(
                f"{root}: sha256 mismatch for {name}: manifest says {expected}, file has {actual}"
            )
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise BundleError(f"{root}: {TENSORS_FILE} cannot be read: {err}") from None
    expected_keys = manifest.tensor_keys()
    if set(tensors) != expected_keys:
        missing = sorted(expected_keys - set(tensors))[:5]
        extra = sorted(set(tensors) - expected_keys)[:5]
        raise BundleError(
            f"{root}: {TENSORS_FILE} does not match the manifest: "
            f"missing {missing}, unexpected {extra}"
        )
    _check_finite(tensors, f"{root}: {TENSORS_FILE}")
    return Bundle(path=root, manifest=manifest, tensors=tensors, digest=digest)
