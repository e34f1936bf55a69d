"""Tests for serving.bundle: round trip, atomic writes and every refusal on load."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving import bundle as bundle_module
from serving.bundle import load_bundle, sha256_file, write_bundle
from serving.errors import BundleError
from serving.manifest import MANIFEST_FILE, TENSORS_FILE, buffer_key, draw_buffer_key, vertex_key

if TYPE_CHECKING:
    from helpers import TinyBundle


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_manifest(bundle_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the parsed manifest.json and write it back."""
    file = bundle_dir / MANIFEST_FILE
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _rehash_tensors(bundle_dir: Path) -> None:
    """Record the tensor file's current sha256, so only checks after the hash can fail."""

    def edit(data: dict[str, Any]) -> None:
        data["files"][TENSORS_FILE] = _sha256(bundle_dir / TENSORS_FILE)

    _edit_manifest(bundle_dir, edit)


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
def test_round_trip_gives_identical_manifest_and_tensors(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle], batchnorm: bool
) -> None:
    tiny = make_tiny_bundle(batchnorm=batchnorm)
    path = tiny.write(tmp_path / "bundle")
    loaded = load_bundle(path)

    assert loaded.path == path
    assert loaded.manifest.model_copy(update={"files": {}}) == tiny.manifest
    assert loaded.tensors.keys() == tiny.tensors.keys()
    for key, tensor in tiny.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype, key
        assert torch.equal(loaded.tensors[key], tensor), key


def test_digest_is_sha256_of_manifest_and_files_pin_the_tensor_file(tiny_bundle_dir: Path) -> None:
    loaded = load_bundle(tiny_bundle_dir)
    assert loaded.digest == _sha256(tiny_bundle_dir / MANIFEST_FILE)
    assert loaded.manifest.files == {TENSORS_FILE: _sha256(tiny_bundle_dir / TENSORS_FILE)}
    assert sha256_file(tiny_bundle_dir / TENSORS_FILE) == _sha256(tiny_bundle_dir / TENSORS_FILE)
    assert sorted(p.name for p in tiny_bundle_dir.iterdir()) == sorted(
        [MANIFEST_FILE, TENSORS_FILE]
    )


def test_accessors_return_vertices_and_member_buffers(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle]
) -> None:
    tiny = make_tiny_bundle(batchnorm=True)
    loaded = load_bundle(tiny.write(tmp_path / "bundle"))
    manifest = loaded.manifest
    vertices = loaded.vertices(1)
    assert len(vertices) == 3
    for j, vertex in enumerate(vertices):
        assert vertex.keys() == set(manifest.parameter_names)
        assert torch.equal(vertex["0.weight"], tiny.tensors[vertex_key(1, j, "0.weight")])
    # A BatchNorm draw gets its own statistics, not its simplex's.
    for s in range(2):
        buffers = loaded.buffers(1, s)
        assert buffers.keys() == set(manifest.buffer_names)
        own = tiny.tensors[draw_buffer_key(1, s, "1.running_mean")]
        shared = tiny.tensors[buffer_key(1, "1.running_mean")]
        assert torch.equal(buffers["1.running_mean"], own)
        assert not torch.equal(buffers["1.running_mean"], shared)


# --- writing --------------------------------------------------------------------------------


def test_write_leaves_no_temporary_directory(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle]
) -> None:
    make_tiny_bundle().write(tmp_path / "bundle")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_save_file(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_bundle().write(tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_bundle(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_tiny_bundle().write(tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken_fsync_write(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")  # after the tensor file is written, before the manifest

    monkeypatch.setattr(bundle_module, "_fsync_write", broken_fsync_write)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_bundle(seed=1).write(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_existing_target_is_refused_without_overwrite(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle]
) -> None:
    path = make_tiny_bundle().write(tmp_path / "bundle")
    before = (path / MANIFEST_FILE).read_bytes()
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        make_tiny_bundle(version="2").write(path)
    assert (path / MANIFEST_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_existing_target_is_replaced_with_overwrite(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle]
) -> None:
    path = make_tiny_bundle().write(tmp_path / "bundle")
    replacement = make_tiny_bundle(seed=1, version="2")
    replacement.write(path, overwrite=True)
    loaded = load_bundle(path)
    assert loaded.manifest.version == "2"
    key = vertex_key(0, 0, "1.weight")
    assert torch.equal(loaded.tensors[key], replacement.tensors[key])
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_write_refuses_tensors_that_do_not_match_the_manifest(
    tmp_path: Path, make_tiny_bundle: Callable[..., TinyBundle], change: str
) -> None:
    tiny = make_tiny_bundle()
    tensors = dict(tiny.tensors)
    if change == "missing":
        key = tensors.popitem()[0]
    else:
        key = "simplex.9.vertex.0.1.weight"
        tensors[key] = torch.zeros(1)
    with pytest.raises(BundleError, match=rf"{change} \[.*{re.escape(key)}"):
        write_bundle(tmp_path / "bundle", tiny.manifest, tensors)
    assert list(tmp_path.iterdir()) == []


# --- refusals on load -----------------------------------------------------------------------


def test_flipped_byte_in_tensor_file_is_refused(tiny_bundle_dir: Path) -> None:
    file = tiny_bundle_dir / TENSORS_FILE
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor: the file still parses, only the hash differs
    file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"sha256 mismatch for {TENSORS_FILE}"):
        load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize("name", [TENSORS_FILE, MANIFEST_FILE])
def test_missing_file_is_refused(tiny_bundle_dir: Path, name: str) -> None:
    (tiny_bundle_dir / name).unlink()
    with pytest.raises(BundleError, match=f"{name} is missing"):
        load_bundle(tiny_bundle_dir)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="nowhere: not a bundle directory"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b'{"name": "\xc3\x28"}', "is not valid JSON"),  # not UTF-8
        (b"[1, 2]", "has no schema_version"),
        (b'{"name": "tiny"}', "has no schema_version"),
    ],
)
def test_unreadable_manifest_is_refused(
    tiny_bundle_dir: Path, content: bytes, message: str
) -> None:
    (tiny_bundle_dir / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize("version", [99, 0, "1"])
def test_unknown_schema_version_is_refused(tiny_bundle_dir: Path, version: object) -> None:
    _edit_manifest(tiny_bundle_dir, lambda data: data.update(schema_version=version))
    with pytest.raises(BundleError, match=rf"unsupported bundle schema version {version!r}"):
        load_bundle(tiny_bundle_dir)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value

    return edit


@pytest.mark.parametrize(
    ("field", "value", "reported"),
    [
        ("temperature", -1.0, "temperature: Input should be greater than 0"),
        ("name", "../escape", "name: String should match pattern"),
        ("task", "segmentation", "task: Input should be 'classification' or 'regression'"),
        ("input.dtype", "float64", "input.dtype: Input should be 'float32'"),
        ("input.std", [1.0, 0.0, 1.0, 1.0], "input: Value error, std entries must be finite"),
        ("simplexes.0.draws.1.alpha", [0.9, 0.9], "simplexes.0.draws.1.alpha: Value error"),
        ("conformal.coverage", 1.5, "conformal.coverage: Input should be less than 1"),
        ("surprise", True, "surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_manifest_field_is_refused_with_its_path(
    tiny_bundle_dir: Path, field: str, value: object, reported: str
) -> None:
    _edit_manifest(tiny_bundle_dir, _set(field, value))
    with pytest.raises(BundleError, match=f"{MANIFEST_FILE} is invalid: ") as excinfo:
        load_bundle(tiny_bundle_dir)
    assert reported in str(excinfo.value)


def test_manifest_without_a_tensor_hash_is_refused(tiny_bundle_dir: Path) -> None:
    _edit_manifest(tiny_bundle_dir, lambda data: data["files"].clear())
    with pytest.raises(BundleError, match=f"lists no hash for {TENSORS_FILE}"):
        load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize("name", ["../outside.bin", "sub/inside.bin", "..", "/tmp/outside.bin"])
def test_file_entry_outside_the_bundle_is_refused(tiny_bundle_dir: Path, name: str) -> None:
    # The named file exists (where it can) with the right hash: only the path check can refuse it.
    target = tiny_bundle_dir / name
    if name not in ("..", "/tmp/outside.bin"):
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    _edit_manifest(tiny_bundle_dir, lambda data: data["files"].update({name: digest}))
    with pytest.raises(BundleError, match="names a file outside the bundle"):
        load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize("name", [TENSORS_FILE, MANIFEST_FILE])
def test_symlinked_file_is_refused(tiny_bundle_dir: Path, tmp_path: Path, name: str) -> None:
    real = tmp_path / f"real-{name}"
    (tiny_bundle_dir / name).rename(real)
    (tiny_bundle_dir / name).symlink_to(real)
    with pytest.raises(BundleError, match=f"{name} is a symbolic link"):
        load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_tensor_file_with_wrong_tensor_names_is_refused(tiny_bundle_dir: Path, change: str) -> None:
    file = tiny_bundle_dir / TENSORS_FILE
    tensors = load_file(file)
    if change == "extra":
        key = "simplex.0.vertex.0.smuggled"
        tensors[key] = torch.zeros(2)
        expected = rf"missing \[\], unexpected \['{key}'\]"
    else:
        key = vertex_key(1, 2, "3.bias")
        del tensors[key]
        expected = rf"missing \['{key}'\], unexpected \[\]"
    save_file(tensors, file)
    _rehash_tensors(tiny_bundle_dir)
    with pytest.raises(
        BundleError, match=f"{TENSORS_FILE} does not match the manifest: {expected}"
    ):
        load_bundle(tiny_bundle_dir)


def test_unparsable_tensor_file_with_matching_hash_is_refused(tiny_bundle_dir: Path) -> None:
    (tiny_bundle_dir / TENSORS_FILE).write_bytes(b"\x00" * 64)
    _rehash_tensors(tiny_bundle_dir)
    with pytest.raises(BundleError, match=f"{TENSORS_FILE} cannot be read"):
        load_bundle(tiny_bundle_dir)


def test_oversized_manifest_is_refused(
    tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(BundleError, match=f"{MANIFEST_FILE} is larger than 100 bytes"):
        load_bundle(tiny_bundle_dir)


def test_oversized_tensor_file_is_refused_before_it_is_read(
    tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = (tiny_bundle_dir / TENSORS_FILE).stat().st_size
    assert load_bundle(tiny_bundle_dir, max_file_bytes=size).tensors
    read = Path.read_bytes
    monkeypatch.setattr(
        Path,
        "read_bytes",
        lambda self: pytest.fail("read") if self.name == TENSORS_FILE else read(self),
    )
    with pytest.raises(
        BundleError, match=f"{TENSORS_FILE} has {size} bytes; the limit is {size - 1}"
    ):
        load_bundle(tiny_bundle_dir, max_file_bytes=size - 1)


def test_loading_never_unpickles(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bundle must never be unpickled")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (torch.serialization, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    loaded = load_bundle(tiny_bundle_dir)
    assert len(loaded.tensors) == len(loaded.manifest.tensor_keys())
    # The tensor file is safetensors (an 8-byte little-endian header length, then JSON).
    raw = (tiny_bundle_dir / TENSORS_FILE).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert set(header) - {"__metadata__"} == set(loaded.tensors)
