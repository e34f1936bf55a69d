"""Acceptance of "train on your own data", end to end on data sets made here: a folder of PNG
shapes in 3 classes, a ``.npz`` of arrays (classification) and a CSV table with a regression
target. Each is trained with ``espro train`` from its config template (shrunk to seconds),
predicted offline with ``espro predict --json``, served by the session's app and asked again
through every protocol; every served answer equals the offline one to FP32_ATOL.

The three bundles join the session server's app only for this module (a redeploy, undone at
its end), so the model list other modules see stays theirs.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import yaml
from espro_client import Client, EsproError, Prediction

from helpers import FP32_ATOL, SHAPES, Server, shape_pngs, wait_until
from serving.bundle import load_bundle
from serving.cli import main
from serving.images import decode_images
from serving.manifest import ImageSpec, Task
from serving.service import INPUT
from training.config import builtin_configs

# torchvision 0.29 deprecates its image codecs (for TorchCodec); the trainer still reads with them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

PROTOCOLS = ("native", "oip-rest", "oip-grpc")
ARRAY_CLASSES = ("low", "mid", "high")
REGRESSION_KEYS = ("mean", "variance", "aleatoric", "epistemic")

SHRINK = {
    "version": "1",
    "seed": 1,
    "device": "cpu",
    "modes": {"count": 2, "epochs": 3, "lr": 0.05, "batch_size": 16},
    "simplex": {"vertices": 1, "epochs": 1, "lr": 0.02, "samples": 2, "lambda": 0.1},
    "draws": {"per_simplex": 2},
    "evaluation": {"noise_severities": [0.5]},
}
"""What a config template's training sections become here: two modes, a 1-vertex simplex
each and a fixed λ, in a second or two."""


@dataclass
class Trained:
    """A bundle trained on data made here, the inputs it is asked about, and what
    ``espro predict --json`` answers for them."""

    bundle: Path
    inputs: np.ndarray
    """Raw instances ``[B, *input_shape]`` (for images: the PNGs decoded as the bundle says)."""
    offline: dict[str, Any]
    """``espro predict BUNDLE inputs.npy --json``."""
    labels: list[Any] = field(default_factory=list)
    """The inputs' true classes or targets."""
    pngs: list[bytes] = field(default_factory=list)
    """The encoded images ``inputs`` were decoded from (image bundles)."""
    offline_pngs: dict[str, Any] | None = None
    """``espro predict BUNDLE a.png b.png ... --json`` (image bundles)."""


def _espro(*args: str) -> str:
    """The ``espro`` command in this process; its standard output, once it exits 0."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    assert status == 0, f"espro {' '.join(args)} exited {status}"
    return out.getvalue()


def _train(root: Path, template: str, name: str, data: dict, model: dict, **modes: Any) -> Path:
    """``espro train`` on the built-in ``template`` with its data section updated by ``data``
    and its training shrunk to :data:`SHRINK` (``modes`` updates its modes), as a user would
    edit a copy of it."""
    config = yaml.safe_load(builtin_configs()[template].read_text())
    config |= SHRINK | {"name": name, "data": config["data"] | data, "model": model}
    config["modes"] = SHRINK["modes"] | modes
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    _espro("train", str(path), "-o", str(root / name))
    return root / name


def _predict(bundle: Path, *inputs: Path) -> dict[str, Any]:
    return json.loads(_espro("predict", str(bundle), *map(str, inputs), "--json"))


def _blobs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Five features around one of three centres, and the centre's name."""
    labels = np.arange(n) % 3
    x = rng.normal(size=(n, 5)) + 2.5 * np.eye(3, 5)[labels]
    return x.astype(np.float32), np.array(ARRAY_CLASSES)[labels]


def _trained_images(root: Path) -> Trained:
    files = shape_pngs(root / "shapes", per_class=12, size=12, splits=("train", "test"))
    # 12 x 12 PNGs read as 8 x 8 instances: the resize is part of what is served.
    data = {"root": str(root / "shapes"), "size": [8, 8], "num_workers": 0, "in_memory": True}
    model = {"architecture": "cnn", "kwargs": {"channels": [4, 8], "hidden": 8}}
    bundle = _train(root, "image-folder", "own-images", data, model, epochs=20, lr=0.2)
    paths = files["test"][::5]  # 8 of the 36, of every class
    pngs = [p.read_bytes() for p in paths]
    spec = load_bundle(bundle).manifest.input.image
    assert spec == ImageSpec(size=(8, 8), color="rgb")
    inputs = decode_images(pngs, spec).numpy()
    np.save(root / "images.npy", inputs)
    return Trained(
        bundle,
        inputs,
        _predict(bundle, root / "images.npy"),
        labels=[p.parent.name for p in paths],
        pngs=pngs,
        offline_pngs=_predict(bundle, *paths),
    )


def _trained_arrays(root: Path) -> Trained:
    rng = np.random.default_rng(0)
    (x, y), (x_test, y_test) = _blobs(rng, 90), _blobs(rng, 15)
    np.savez(root / "own.npz", x_train=x, y_train=y, x_test=x_test, y_test=y_test)
    model = {"architecture": "mlp", "kwargs": {"hidden": [16]}}
    bundle = _train(root, "arrays", "own-arrays", {"path": str(root / "own.npz")}, model)
    inputs, labels = _blobs(rng, 6)
    np.save(root / "arrays.npy", inputs)
    return Trained(bundle, inputs, _predict(bundle, root / "arrays.npy"), labels=labels.tolist())


def _trained_table(root: Path) -> Trained:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 3))
    y = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] + 0.1 * rng.normal(size=120)
    rows = [",".join(f"{v:.5f}" for v in (*row, target)) for row, target in zip(x, y, strict=True)]
    (root / "own.csv").write_text("\n".join(["a,b,c,target", *rows]) + "\n")
    data = {"path": str(root / "own.csv"), "label": "target", "task": "regression"}
    model = {"architecture": "mlp", "kwargs": {"hidden": [16]}}
    bundle = _train(root, "table", "own-table", data, model)
    inputs = rng.normal(size=(6, 3)).astype(np.float32)
    np.save(root / "table.npy", inputs)
    targets = (inputs.astype(np.float64) @ [2, -1, 0.5]).tolist()
    return Trained(bundle, inputs, _predict(bundle, root / "table.npy"), labels=targets)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    """The three bundles, by model name, trained on data made here."""
    root = tmp_path_factory.mktemp("own-data")
    # One intra-op thread: these networks are far too small to share out, and on a machine
    # whose cores are busy a second thread costs ten times the training time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "own-images": _trained_images(root),
            "own-arrays": _trained_arrays(root),
            "own-table": _trained_table(root),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(server: Server, trained: dict[str, Trained]) -> Iterator[Server]:
    """The session's app serving the three bundles too, for this module only."""
    server.redeploy(bundles=[*server.config.bundles, *(str(t.bundle) for t in trained.values())])
    try:
        with Client(server.http, protocol="oip-rest") as client:
            wait_until(lambda: all(client.ready(name) for name in trained), "the new models")
        yield server
    finally:
        server.redeploy()


def _client(server: Server, protocol: str) -> Client:
    url = f"grpc://{server.grpc}" if protocol == "oip-grpc" else server.http
    return Client(url, protocol=protocol)  # type: ignore[arg-type]


def _assert_answers(p: Prediction, offline: dict[str, Any], bundle: Path, protocol: str) -> None:
    """Every field of the client's prediction ``p`` equals ``espro predict --json``'s."""
    records, close = offline["predictions"], {"rtol": 0, "atol": FP32_ATOL}
    manifest = load_bundle(bundle).manifest

    def column(key: str) -> np.ndarray:
        return np.array([r[key] for r in records])

    assert (p.model_name, p.model_version) == (offline["model_name"], offline["model_version"])
    assert p.bundle_sha256 == offline["bundle_sha256"]
    np.testing.assert_allclose(p.probabilities, column("probabilities"), **close)
    numbers = ("confidence", "entropy", "expected_entropy", "mutual_information", "disagreement")
    for key in numbers:
        np.testing.assert_allclose(getattr(p, key), column(key), **close, err_msg=key)
    np.testing.assert_array_equal(p.labels, column("label"))
    assert p.class_names.tolist() == column("class_name").tolist()
    if "abstain" in records[0]:
        np.testing.assert_array_equal(p.abstain, column("abstain"))
    if "prediction_set" in records[0]:
        names = [r["prediction_set"] for r in records]
        if protocol == "native":
            assert p.prediction_set_names == names
        else:
            sets = [[c in s for c in manifest.class_names] for s in names]
            np.testing.assert_array_equal(p.prediction_sets, sets)


# --------------------------------------------------------------------------- offline


def test_each_source_trains_a_bundle_of_its_task_shape_and_classes(
    trained: dict[str, Trained],
) -> None:
    expected = {
        "own-images": (Task.CLASSIFICATION, (3, 8, 8), SHAPES),
        # String labels name the classes in sorted order.
        "own-arrays": (Task.CLASSIFICATION, (5,), ("high", "low", "mid")),
        "own-table": (Task.REGRESSION, (3,), ()),
    }
    for name, (task, shape, classes) in expected.items():
        manifest = load_bundle(trained[name].bundle).manifest
        assert (manifest.name, manifest.task) == (name, task)
        assert (manifest.input.shape, manifest.class_names) == (shape, classes)
        assert len(trained[name].offline["predictions"]) == len(trained[name].inputs)
    records = trained["own-table"].offline["predictions"]
    assert all(r["variance"] > 0 and r.keys() >= set(REGRESSION_KEYS) for r in records)


def test_each_bundle_learnt_its_data(trained: dict[str, Trained]) -> None:
    """Loose bounds, well within what a few seconds of training reach: the point is that the
    labels, classes and targets of each source reached the network the right way round."""
    for name in ("own-images", "own-arrays"):
        got = [r["class_name"] for r in trained[name].offline["predictions"]]
        right = sum(g == want for g, want in zip(got, trained[name].labels, strict=True))
        assert right >= 0.75 * len(got), (name, got, trained[name].labels)
    table = trained["own-table"]
    means = [r["mean"] for r in table.offline["predictions"]]
    assert np.corrcoef(means, table.labels)[0, 1] > 0.9, (means, table.labels)


def test_espro_predict_on_pngs_answers_as_on_the_decoded_array(
    trained: dict[str, Trained],
) -> None:
    images = trained["own-images"]
    assert images.offline_pngs is not None
    for got, want in zip(
        images.offline_pngs["predictions"], images.offline["predictions"], strict=True
    ):
        assert got["label"] == want["label"]
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=FP32_ATOL)


# --------------------------------------------------------------------------- served


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", ["own-images", "own-arrays"])
def test_served_classifiers_answer_as_espro_predict(
    served: Server, trained: dict[str, Trained], name: str, protocol: str
) -> None:
    own = trained[name]
    with _client(served, protocol) as client:
        prediction = client.predict(name, own.inputs)
    _assert_answers(prediction, own.offline, own.bundle, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pngs_sent_to_the_server_answer_as_their_decoded_array(
    served: Server, trained: dict[str, Trained], protocol: str
) -> None:
    """PNG bytes over each protocol: the numbers of the same images sent as the array the
    bundle's image spec decodes them to, and of ``espro predict a.png ...``."""
    images = trained["own-images"]
    assert images.offline_pngs is not None
    with _client(served, protocol) as client:
        from_pngs = client.predict_images("own-images", images.pngs)
        from_array = client.predict("own-images", images.inputs)
    np.testing.assert_allclose(
        from_pngs.probabilities, from_array.probabilities, rtol=0, atol=FP32_ATOL
    )
    _assert_answers(from_pngs, images.offline_pngs, images.bundle, protocol)


def test_the_served_regression_model_answers_as_espro_predict_at_every_door(
    served: Server, trained: dict[str, Trained]
) -> None:
    """Mean, variance, aleatoric and epistemic parts over native JSON, OIP REST and OIP gRPC;
    espro_client supports classifiers only and refuses the model in one message."""
    table = trained["own-table"]
    x = table.inputs
    want = {k: [r[k] for r in table.offline["predictions"]] for k in REGRESSION_KEYS}

    native = requests.post(
        f"{served.http}/v1/models/own-table/predict", json={"inputs": x.tolist()}, timeout=30
    )
    assert native.status_code == 200, native.text
    body = native.json()
    assert body["bundle_sha256"] == table.offline["bundle_sha256"]
    answers = {"native": {k: [r[k] for r in body["predictions"]] for k in REGRESSION_KEYS}}

    rest = [thttp.InferInput(INPUT, list(x.shape), "FP32").set_data_from_numpy(x)]
    with contextlib.closing(thttp.InferenceServerClient(served.http[len("http://") :])) as oip:
        result = oip.infer("own-table", rest)
    answers["oip-rest"] = {k: result.as_numpy(k) for k in REGRESSION_KEYS}
    grpc_ = [tgrpc.InferInput(INPUT, list(x.shape), "FP32").set_data_from_numpy(x)]
    with contextlib.closing(tgrpc.InferenceServerClient(served.grpc)) as oip:
        result = oip.infer("own-table", grpc_)
    answers["oip-grpc"] = {k: result.as_numpy(k) for k in REGRESSION_KEYS}

    for door, got in answers.items():
        for key in REGRESSION_KEYS:
            np.testing.assert_allclose(
                np.ravel(got[key]), want[key], rtol=0, atol=FP32_ATOL, err_msg=f"{door} {key}"
            )
    for protocol in PROTOCOLS:
        with _client(served, protocol) as client, pytest.raises(EsproError, match="classif"):
            client.predict("own-table", x)
