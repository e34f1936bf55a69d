"""Encoded images in, through every door: the bundle's image spec decodes them as the trainer
did, and what a server must not decode is refused before it is."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from pydantic import ValidationError
from torchvision.io import encode_jpeg, encode_png
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request as triton_grpc_request

from helpers import tiny_bundle
from serving import images
from serving.bundle import load_bundle
from serving.cli import main
from serving.errors import ServiceError
from serving.images import decode_images, dimensions, sniff
from serving.manifest import ImageSpec, InputSpec
from serving.predictor import Predictor
from serving.proto import grpc_predict_v2_pb2 as pb
from serving.service import INPUT, InferenceService, ModelRepository, model_metadata
from training.images import ImageFiles

SPEC = ImageSpec(size=(2, 2), color="grayscale")
"""Grayscale 2x2: four numbers, the tiny bundle's mlp input flattened."""


def _png(seed: int, height: int = 5, width: int = 6) -> bytes:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    return encode_png(image).numpy().tobytes()


def _bomb() -> bytes:
    """A PNG whose header claims 100000x100000 pixels, followed by one tiny chunk."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return images._PNG + chunk + b"\0\0\0\0IEND\xaeB`\x82"


@pytest.fixture
def image_bundle(tmp_path: Path) -> Path:
    spec = InputSpec(shape=(1, 2, 2), mean=(0.5,), std=(0.25,), image=SPEC)
    return tiny_bundle(name="pets", input=spec).write(tmp_path / "pets")


@pytest.fixture
def service(image_bundle: Path, tmp_path: Path) -> InferenceService:
    plain = tiny_bundle().write(tmp_path / "tiny")
    return InferenceService(
        ModelRepository([Predictor(load_bundle(image_bundle)), Predictor(load_bundle(plain))])
    )


def _trained(pngs: list[bytes], tmp_path: Path) -> torch.Tensor:
    """The instances the trainer's image folder makes of these files."""
    paths = []
    for i, data in enumerate(pngs):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    files = ImageFiles(paths, [0] * len(paths), SPEC.size, SPEC.color)
    return torch.stack([files[i][0] for i in range(len(files))])


def _native(service: InferenceService, x: torch.Tensor) -> list[list[float]]:
    body = json.dumps({"inputs": x.tolist()})
    return [p["probabilities"] for p in json.loads(service.native("pets", body))["predictions"]]


# --------------------------------------------------------------------------- decoding


def test_images_decode_exactly_as_the_trainer_read_them(tmp_path: Path) -> None:
    pngs = [_png(0), _png(1, 2, 2)]
    torch.testing.assert_close(decode_images(pngs, SPEC), _trained(pngs, tmp_path), atol=0, rtol=0)
    rgb = ImageSpec(size=(3, 4))
    assert decode_images([_png(2)], rgb).shape == (1, 3, 3, 4)


def test_headers_give_the_dimensions_without_decoding() -> None:
    image = torch.zeros(3, 7, 9, dtype=torch.uint8)
    jpeg = encode_jpeg(image).numpy().tobytes()
    assert sniff(jpeg) == "jpeg" and dimensions(jpeg, "jpeg") == (9, 7)
    assert sniff(_png(0)) == "png" and dimensions(_png(0), "png") == (6, 5)
    assert sniff(b"GIF89a....") == "gif" and sniff(b"hello") is None


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"GIF89a\x01\x00\x01\x00", 415, "image 0 is gif; this model takes png, jpeg"),
        (b"plain text", 415, "image 0 is an unknown format"),
        (_png(0)[:20], 400, "header is cut short"),
        (_png(0)[:40], 400, "image 0: cannot decode it"),
        (b"\xff\xd8\xff\xd9", 400, "header is cut short"),
    ],
)
def test_refusals_name_the_image(data: bytes, status: int, message: str) -> None:
    with pytest.raises(ServiceError, match=message) as err:
        decode_images([data], SPEC)
    assert err.value.status == status


def test_a_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "to_instance", lambda *a: pytest.fail("decoded a bomb"))
    with pytest.raises(ServiceError, match="100000x100000, over this model's") as err:
        decode_images([_png(0), _bomb()], SPEC)
    assert err.value.status == 413


def test_a_request_of_too_many_images_is_refused_before_decoding() -> None:
    big = ImageSpec(size=(4096, 4096))
    with pytest.raises(ServiceError, match="too many for one request") as err:
        decode_images([b""] * 6, big)
    assert err.value.status == 413


def test_a_bundle_declares_only_formats_it_takes() -> None:
    with pytest.raises(ServiceError, match="jpeg; this model takes png") as err:
        decode_images(
            [encode_jpeg(torch.zeros(3, 2, 2, dtype=torch.uint8)).numpy().tobytes()],
            ImageSpec(size=(2, 2), color="grayscale", formats=("png",)),
        )
    assert err.value.status == 415


def test_the_image_spec_must_make_the_input_shape() -> None:
    with pytest.raises(ValidationError, match="not the input shape"):
        InputSpec(shape=(3, 2, 2), mean=(0, 0, 0), std=(1, 1, 1), image=SPEC)
    assert InputSpec(shape=(4,), mean=(0,) * 4, std=(1,) * 4).image is None


# --------------------------------------------------------------------------- doors


def test_every_door_answers_images_as_the_trainer_reads_them(
    service: InferenceService, tmp_path: Path
) -> None:
    pngs = [_png(0), _png(1)]
    want = _native(service, _trained(pngs, tmp_path))
    texts = [base64.b64encode(p).decode() for p in pngs]
    native = json.loads(service.native("pets", json.dumps({"images": texts})))
    np.testing.assert_allclose([p["probabilities"] for p in native["predictions"]], want, atol=1e-5)

    for binary, elements in ((True, pngs), (False, [t.encode() for t in texts])):
        tensor = thttp.InferInput(INPUT, [2], "BYTES")
        tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
        body, length = thttp.InferenceServerClient.generate_request_body([tensor])
        out, out_length = service.rest_infer("pets", None, body, length)
        result = thttp.InferResult.from_response_body(out, header_length=out_length)
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)

    tensor = tgrpc.InferInput(INPUT, [2], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=object))
    theirs = triton_grpc_request("pets", [tensor], "", "", None, 0, False, False, 0, None, None)
    ours = service.grpc_infer(pb.ModelInferRequest.FromString(theirs.SerializeToString()))
    result = tgrpc.InferResult(triton_pb.ModelInferResponse.FromString(ours.SerializeToString()))
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)


def test_doors_refuse_what_they_must_not_decode(service: InferenceService) -> None:
    def native(model: str, body: dict) -> ServiceError:
        with pytest.raises(ServiceError) as err:
            service.native(model, json.dumps(body))
        return err.value

    bomb = base64.b64encode(_bomb()).decode()
    assert native("pets", {"images": [bomb]}).status == 413
    assert native("pets", {"images": ["not base64!"]}).message.startswith("images[0] is not")
    refused = native("tiny", {"images": [base64.b64encode(_png(0)).decode()]})
    assert refused.status == 400 and "not images" in refused.message
    both = native("pets", {"images": [bomb], "inputs": [[1, 2, 3, 4]]})
    assert both.status == 422 and both.message == "send inputs or images, not both"

    tensor = thttp.InferInput(INPUT, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"GIF89a\x01\x00"], dtype=object), binary_data=True)
    body, length = thttp.InferenceServerClient.generate_request_body([tensor])
    with pytest.raises(ServiceError) as err:
        service.rest_infer("pets", None, body, length)
    assert err.value.status == 415
    assert err.value.grpc_code.name == "INVALID_ARGUMENT"


def test_images_in_json_may_exceed_the_limit_on_other_json(service: InferenceService) -> None:
    big = _png(3, 200, 200)
    assert len(big) > 70_000
    body = json.dumps({"images": [base64.b64encode(big).decode()]})
    assert len(json.loads(service.native("pets", body))["predictions"]) == 1


# --------------------------------------------------------------------------- command


def test_espro_predict_reads_image_files(
    image_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pngs = [_png(0), _png(1)]
    paths = [tmp_path / "cat.png", tmp_path / "dog.png"]
    for path, data in zip(paths, pngs, strict=True):
        path.write_bytes(data)
    assert main(["predict", str(image_bundle), *map(str, paths), "--json"]) == 0
    got = [p["probabilities"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    predictor = Predictor(load_bundle(image_bundle))
    want = predictor.predict(_trained(pngs, tmp_path)).probs
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)

    (tmp_path / "bad.png").write_bytes(b"GIF89a")
    assert main(["predict", str(image_bundle), str(tmp_path / "bad.png")]) == 2
    assert capsys.readouterr().err.strip().endswith("bad.png is gif; this model takes png, jpeg")
    plain = tiny_bundle().write(tmp_path / "plain")
    assert main(["predict", str(plain), str(paths[0])]) == 2
    assert "not trained on images" in capsys.readouterr().err


def test_the_metadata_of_an_image_model_lists_its_input_as_numbers_and_as_images(
    service: InferenceService,
) -> None:
    def inputs(model: str) -> list[tuple[str, str, list[int]]]:
        meta = model_metadata(service.repository, model, None)
        return [(t.name, t.datatype, t.shape) for t in meta.inputs]

    assert inputs("pets") == [(INPUT, "FP32", [-1, 1, 2, 2]), (INPUT, "BYTES", [-1])]
    assert inputs("tiny") == [(INPUT, "FP32", [-1, *tiny_bundle().manifest.input.shape])]
