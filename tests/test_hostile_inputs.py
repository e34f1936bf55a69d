"""Hostile bundles and inputs: each is refused when it is loaded or read, with one line.

A bundle that loads is a bundle that answers: a tampered manifest (its hashes recomputed, as
anyone can, since it is not signed) or tensor file is a :class:`BundleError` naming the file
and the problem, and ``espro predict`` turns every refusal of a bundle, an input file or a flag
into one ``error:`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from helpers import tiny_bundle
from serving.bundle import load_bundle, write_bundle
from serving.errors import BundleError
from serving.manifest import MANIFEST_FILE, TENSORS_FILE, InputSpec, Manifest, vertex_key
from serving.predictor import Predictor

Tamper = Callable[[Path], None]
WEIGHT = vertex_key(0, 1, "1.weight")
"""A parameter of the tiny bundle's mlp: float32 [8, 4]."""
RAW = "@raw@"


def _set(data: dict[str, Any], field: str, value: object) -> None:
    """Set the dotted ``field`` (list items by index) of parsed JSON."""
    *parents, leaf = field.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(leaf) if isinstance(node, list) else leaf] = value


def _rehash(path: Path, name: str = TENSORS_FILE, data: bytes | None = None) -> None:
    """Record ``name``'s sha256 in the manifest, as a tamperer would."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    digest = hashlib.sha256((path / name).read_bytes() if data is None else data).hexdigest()
    manifest["files"][name] = digest
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def raw(field: str, text: str) -> Tamper:
    """Set a manifest field to raw JSON text (``NaN``, ``1e999``, deep nesting, …)."""

    def tamper(path: Path) -> None:
        data = json.loads((path / MANIFEST_FILE).read_text())
        _set(data, field, RAW)
        (path / MANIFEST_FILE).write_text(json.dumps(data).replace(f'"{RAW}"', text))

    return tamper


def field(name: str, value: object) -> Tamper:
    """Set a manifest field to a JSON value."""
    return raw(name, json.dumps(value))


def tensor(key: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Tamper:
    """Replace one tensor of the tensor file and record the file's new hash."""

    def tamper(path: Path) -> None:
        tensors = load_file(path / TENSORS_FILE)
        tensors[key] = edit(tensors[key]).contiguous()
        save_file(tensors, path / TENSORS_FILE)
        _rehash(path)

    return tamper


def hard_link(path: Path) -> None:
    """An extra file of the bundle that is another name of its tensor file."""
    os.link(path / TENSORS_FILE, path / "extra.bin")
    _rehash(path, "extra.bin")


def padded(path: Path) -> None:
    """A tensor file with one byte more than its header accounts for, hash recomputed."""
    with open(path / TENSORS_FILE, "ab") as f:
        f.write(b"\0")
    _rehash(path)


def sparse_gigabyte(path: Path) -> None:
    """A tensor file extended to 1 GiB of holes; its hash is left alone (reading it to hash
    it is what must not happen)."""
    with open(path / TENSORS_FILE, "r+b") as f:
        f.truncate(2**30)


def nan_at(t: torch.Tensor) -> torch.Tensor:
    return t.index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(math.nan))


# Every tampering, and what its refusal says. The tiny bundle has conformal sets and abstention.
BROKEN_BUNDLES: dict[str, tuple[Tamper, str]] = {
    "alpha-nan": (raw("simplexes.0.draws.0.alpha.0", "NaN"), "NaN is not a JSON number"),
    "alpha-1e999": (raw("simplexes.0.draws.0.alpha.0", "1e999"), "1e999 is out of range"),
    "alpha-nan-string": (
        field("simplexes.0.draws.0.alpha.0", "NaN"),
        "simplexes.0.draws.0.alpha.0: Input should be a finite number",
    ),
    "temperature-infinity": (raw("temperature", "Infinity"), "Infinity is not a JSON number"),
    "temperature-infinity-string": (
        field("temperature", "Infinity"),
        "temperature: Input should be a finite number",
    ),
    "conformal-threshold-nan": (
        field("conformal.threshold", "NaN"),
        "conformal.threshold: Input should be a finite number",
    ),
    "abstention-threshold-nan": (
        raw("abstention.threshold", "NaN"),
        "NaN is not a JSON number",
    ),
    "input-mean-infinity": (
        field("input.mean.0", "-Infinity"),
        "input.mean.0: Input should be a finite number",
    ),
    "metric-infinity": (raw("metrics.nll", "-Infinity"), "-Infinity is not a JSON number"),
    "input-shape-huge": (
        field("input.shape", [4, 2**20, 2**20]),
        "shape holds more than",
    ),
    "huge-integer": (raw("num_outputs", "9" * 5000), "manifest.json is not valid JSON"),
    "deeply-nested": (
        raw("training.deep", "[" * 100_000 + "]" * 100_000),
        "manifest.json is not valid JSON: maximum recursion depth",
    ),
    "nested": (raw("training.deep", "[" * 40 + "]" * 40), "nests deeper than 32 levels"),
    "weights-nan": (tensor(WEIGHT, nan_at), f"tensor {WEIGHT} holds NaN or infinite values"),
    "weights-infinity": (
        tensor(WEIGHT, lambda t: t.fill_(math.inf)),
        f"tensor {WEIGHT} holds NaN or infinite values",
    ),
    "weights-float64": (
        tensor(WEIGHT, lambda t: t.double()),
        f"tensor {WEIGHT} is torch.float64 [8, 4]; architecture 'mlp' expects torch.float32 [8, 4]",
    ),
    "weights-shape": (
        tensor(WEIGHT, lambda t: t[:, :3]),
        f"tensor {WEIGHT} is torch.float32 [8, 3]; architecture 'mlp' expects",
    ),
    "hard-link": (hard_link, "is a hard link (2 names)"),
    "padded-tensor-file": (padded, "its header accounts for"),
    "sparse-tensor-file": (sparse_gigabyte, f"has {2**30} bytes; its header accounts for"),
    "custom-architecture": (
        field("architecture.name", "os:system"),
        "architecture 'os:system' cannot be built: custom architecture 'os:system' executes",
    ),
    "unknown-architecture": (field("architecture.name", "nope"), "unknown architecture 'nope'"),
    "architecture-arguments": (
        field("architecture.kwargs.hidden", "x"),
        "architecture 'mlp' cannot be built",
    ),
    "architecture-a-terabyte-wide": (  # built on the meta device: nothing is allocated
        field("architecture.kwargs.hidden", [10**12]),
        "expects torch.float32 [1000000000000, 4]",
    ),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every broken bundle, by name, with ``good`` (the untouched one)."""
    root = tmp_path_factory.mktemp("broken")
    bundles = {"good": tiny_bundle().write(root / "good")}
    for name, (tamper, _) in BROKEN_BUNDLES.items():
        bundles[name] = tiny_bundle().write(root / name)
        tamper(bundles[name])
    return bundles


@pytest.mark.parametrize("name", BROKEN_BUNDLES)
def test_a_broken_bundle_is_refused_naming_the_problem(broken: dict[str, Path], name: str) -> None:
    with pytest.raises(BundleError) as info:
        Predictor.from_path(broken[name])
    message = str(info.value)
    assert message.startswith(f"{broken[name]}: ")
    assert BROKEN_BUNDLES[name][1] in message
    assert "\n" not in message


def test_the_good_bundle_loads(broken: dict[str, Path]) -> None:
    assert Predictor.from_path(broken["good"]).num_members == 4


def test_a_sparse_tensor_file_is_refused_from_its_header(broken: dict[str, Path]) -> None:
    """A gigabyte of holes is refused after reading its header, never read whole."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(BundleError, match="its header accounts for"):
        load_bundle(broken["sparse-tensor-file"])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 2**10


@pytest.mark.parametrize("name", [TENSORS_FILE, MANIFEST_FILE])
def test_a_file_with_another_name_outside_the_bundle_is_refused(tmp_path: Path, name: str) -> None:
    path = tiny_bundle().write(tmp_path / "bundle")
    os.link(path / name, tmp_path / "elsewhere")
    with pytest.raises(BundleError, match=f"{name} is a hard link"):
        load_bundle(path)


# --- writing refuses what loading would -----------------------------------------------------


def test_manifests_refuse_non_finite_numbers() -> None:
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationError, match="finite number"):
            tiny_bundle(temperature=value)
        with pytest.raises(ValidationError, match="finite number"):
            InputSpec(shape=(1,), mean=(value,), std=(1.0,))


def _nan_alpha(manifest: Manifest) -> Manifest:
    first = manifest.simplexes[0]
    draw = first.draws[0].model_copy(update={"alpha": (math.nan, 1.0)})
    simplex = first.model_copy(update={"draws": (draw, *first.draws[1:])})
    return manifest.model_copy(update={"simplexes": (simplex, *manifest.simplexes[1:])})


def _nan_threshold(spec: str) -> Callable[[Manifest], Manifest]:
    def edit(manifest: Manifest) -> Manifest:
        nan = getattr(manifest, spec).model_copy(update={"threshold": math.nan})
        return manifest.model_copy(update={spec: nan})

    return edit


# model_copy skips validation, as a caller's bug would: write_bundle must still refuse.
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.model_copy(update={"temperature": math.inf}),
            "temperature: Input should be a finite number",
        ),
        (
            lambda m: m.model_copy(update={"metrics": {"nll": math.nan}}),
            "the manifest cannot be written as JSON: Out of range float values",
        ),
        (_nan_threshold("conformal"), "conformal.threshold: Input should be a finite number"),
        (_nan_threshold("abstention"), "abstention.threshold: Input should be a finite number"),
        (_nan_alpha, "simplexes.0.draws.0.alpha.0: Input should be a finite number"),
    ],
    ids=["temperature", "metrics", "conformal", "abstention", "alpha"],
)
def test_write_refuses_a_non_finite_manifest(
    tmp_path: Path, edit: Callable[[Manifest], Manifest], message: str
) -> None:
    tiny = tiny_bundle()
    with pytest.raises(BundleError) as info:
        write_bundle(tmp_path / "bundle", edit(tiny.manifest), tiny.tensors)
    assert str(info.value).startswith(f"{tmp_path / 'bundle'}: ")
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_a_non_finite_tensor(tmp_path: Path) -> None:
    tiny = tiny_bundle()
    tensors = {**tiny.tensors, WEIGHT: nan_at(tiny.tensors[WEIGHT])}
    with pytest.raises(BundleError, match=f"tensor {WEIGHT} holds NaN or infinite values"):
        write_bundle(tmp_path / "bundle", tiny.manifest, tensors)
    assert list(tmp_path.iterdir()) == []


# --- the command line: one line, exit status 2 ----------------------------------------------


def _npy_header_only(path: Path, shape: tuple[int, ...]) -> None:
    """A .npy file whose header declares ``shape`` float32 data and that holds 16 bytes."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape}
        )
        f.write(b"\0" * 16)


BROKEN_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "deeply-nested.json": (
        lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
        "cannot read inputs: maximum recursion depth",
    ),
    "nested.json": (
        lambda p: p.write_text("[" * 30 + "1" + "]" * 30),
        "expected inputs of shape [batch, 4], got [1, 1,",
    ),
    "huge-integer.json": (
        lambda p: p.write_text(f"[[{10**300}, 0, 0, 0]]"),
        "expected real numbers, got object",
    ),
    "huge-digits.json": (
        lambda p: p.write_text(f"[[{'9' * 5000}, 0, 0, 0]]"),
        "cannot read inputs: Exceeds the limit (4300 digits)",
    ),
    "beyond-float32.json": (lambda p: p.write_text("[[1e39, 0, 0, 0]]"), "float32's range"),
    "beyond-float64.json": (lambda p: p.write_text("[[1e999, 0, 0, 0]]"), "float32's range"),
    "nan.json": (lambda p: p.write_text("[[NaN, 0, 0, 0]]"), "must be finite numbers"),
    "strings.json": (
        lambda p: p.write_text('[["1", "2", "3", "4"]]'),
        "expected real numbers, got <U1",
    ),
    "booleans.json": (
        lambda p: p.write_text("[[true, false, true, false]]"),
        "expected real numbers, got bool",
    ),
    "nulls.json": (
        lambda p: p.write_text("[[null, 0, 0, 0]]"),
        "expected real numbers, got object",
    ),
    "no-inputs.json": (
        lambda p: p.write_text('{"instances": [[0, 0, 0, 0]]}'),
        'expected a JSON list or {"inputs": [...]}',
    ),
    "not-json.json": (lambda p: p.write_text("[[0, 0, 0, 0"), "cannot read inputs: Expecting"),
    "25-gigabytes.npy": (
        lambda p: _npy_header_only(p, (6_250_000_000, 1)),
        "its header declares 25000000000 bytes of data; the file holds 16",
    ),
    "complex.npy": (
        lambda p: np.save(p, np.zeros((2, 4), np.complex64)),
        "expected real numbers, got complex64",
    ),
    "objects.npy": (
        lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "allow_pickle=False",
    ),
    "float64-beyond-float32.npy": (
        lambda p: np.save(p, np.full((2, 4), 1e300)),
        "within float32's range",
    ),
    "wrong-shape.npy": (
        lambda p: np.save(p, np.zeros((2, 3), np.float32)),
        "expected inputs of shape [batch, 4], got [2, 3]",
    ),
    "empty.npy": (lambda p: np.save(p, np.zeros((0, 4), np.float32)), "the batch is empty"),
    "not-npy.npy": (lambda p: p.write_bytes(b"garbage"), "cannot read inputs: EOF"),
    "inputs.txt": (lambda p: p.write_text("0 0 0 0"), "expected a .npy or .json file"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every broken input file, by name, with ``good.npy``."""
    root = tmp_path_factory.mktemp("inputs")
    files = {"good.npy": root / "good.npy"}
    np.save(files["good.npy"], np.zeros((2, 4), np.float32))
    for name, (write, _) in BROKEN_INPUTS.items():
        files[name] = root / name
        write(files[name])
    return files


def _predict(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "serving.cli", "predict", *map(str, args), "--json"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _assert_refused_in_one_line(result: subprocess.CompletedProcess[str], subject: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {subject}"), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("name", BROKEN_BUNDLES)
def test_predict_refuses_a_broken_bundle_in_one_line(
    broken: dict[str, Path], inputs: dict[str, Path], name: str
) -> None:
    result = _predict(broken[name], inputs["good.npy"])
    _assert_refused_in_one_line(result, str(broken[name]))
    assert BROKEN_BUNDLES[name][1] in result.stderr


@pytest.mark.parametrize("name", BROKEN_INPUTS)
def test_predict_refuses_a_broken_input_in_one_line(
    broken: dict[str, Path], inputs: dict[str, Path], name: str
) -> None:
    result = _predict(broken["good"], inputs[name])
    _assert_refused_in_one_line(result, str(inputs[name]))
    assert BROKEN_INPUTS[name][1] in result.stderr


@pytest.mark.parametrize(
    ("flags", "subject"),
    [
        (["--device", "foo"], "--device: 'foo' is not a device"),
        (["--draws", "9"], "--draws: draws must be between 1 and 2"),
        (["--draws", "many"], "--draws: invalid int value"),
    ],
)
def test_predict_refuses_a_bad_flag_in_one_line(
    broken: dict[str, Path], inputs: dict[str, Path], flags: list[str], subject: str
) -> None:
    _assert_refused_in_one_line(_predict(broken["good"], inputs["good.npy"], *flags), subject)


def test_predict_refuses_outputs_that_overflow(tmp_path: Path, inputs: dict[str, Path]) -> None:
    """Finite weights so large that the logits overflow: no bare NaN in the JSON."""
    tiny = tiny_bundle()
    huge = {k: v * 1e30 if k.endswith("weight") else v for k, v in tiny.tensors.items()}
    path = write_bundle(tmp_path / "huge", tiny.manifest, huge)
    np.save(tmp_path / "ones.npy", np.ones((2, 4), np.float32))
    result = _predict(path, tmp_path / "ones.npy")
    _assert_refused_in_one_line(result, str(tmp_path / "ones.npy"))
    assert "outputs are not finite" in result.stderr


def test_predict_prints_strict_json(broken: dict[str, Path], inputs: dict[str, Path]) -> None:
    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in the output")

    result = _predict(broken["good"], inputs["good.npy"])
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout, parse_constant=refuse)["predictions"]) == 2


# --- espro-client refuses the same files, and its own flags, before it calls a server -------

UNREACHABLE = "http://127.0.0.1:9"
"""No server is called: every refusal below comes first."""


def _client(*args: str | Path) -> int:
    """``espro-client predict`` on the unreachable server; its exit status."""
    from espro_client.cli import main

    try:
        return main(["predict", UNREACHABLE, *map(str, args), "--model", "tiny"])
    except SystemExit as exited:  # argparse
        return int(exited.code or 0)


@pytest.mark.parametrize(
    "name",
    [
        "25-gigabytes.npy",
        "complex.npy",
        "objects.npy",
        "float64-beyond-float32.npy",
        "empty.npy",
        "not-npy.npy",
        "missing.npy",
    ],
)
def test_client_refuses_a_broken_input_in_one_line(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = inputs.get(name, tmp_path / name)
    assert _client(path) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: "), err


@pytest.mark.parametrize(
    ("flags", "subject"),
    [
        (
            ["--token-file", "/nonexistent/token"],
            "--token-file: /nonexistent/token: cannot be read",
        ),
        (["--chunk-size", "0"], "--chunk-size: must be at least 1"),
        (["--version", "1"], "--version: the native protocol answers with the newest version"),
        (["--draws", "many"], "--draws: invalid int value"),
    ],
)
def test_client_refuses_a_bad_flag_in_one_line(
    inputs: dict[str, Path], capsys: pytest.CaptureFixture[str], flags: list[str], subject: str
) -> None:
    assert _client(inputs["good.npy"], *flags) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {subject}"), err
