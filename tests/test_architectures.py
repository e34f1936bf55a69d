"""Tests for serving.architectures: every registered builder, custom builders and errors."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from serving import architectures
from serving.architectures import ARCHITECTURES, create_model, register_architecture

# Small inputs each architecture accepts; a new registration defaults to a CIFAR-sized image.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"mlp": (5,), "cnn": (2, 12)}
DEFAULT_INPUT_SHAPE = (3, 32, 32)
NUM_OUTPUTS = 3


def tiny_net(*, input_shape: Sequence[int], num_outputs: int, bias: bool = True) -> nn.Module:
    """A custom architecture, loaded by create_model as '<this module>:tiny_net'."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_outputs, bias=bias))


def not_a_module(*, input_shape: Sequence[int], num_outputs: int) -> str:
    return "not a network"


def _forward(model: nn.Module, input_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, *input_shape))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_registered_architecture_maps_inputs_to_outputs(name: str) -> None:
    input_shape = INPUT_SHAPES.get(name, DEFAULT_INPUT_SHAPE)
    model = create_model(name, input_shape=input_shape, num_outputs=NUM_OUTPUTS)
    assert isinstance(model, nn.Module)
    assert sum(parameter.numel() for parameter in model.parameters()) > 0
    output = _forward(model, input_shape)
    assert output.shape == (2, NUM_OUTPUTS)
    assert torch.isfinite(output).all()


@pytest.mark.parametrize(
    ("input_shape", "conv_type"),
    [((1, 40), nn.Conv1d), ((2, 9), nn.Conv1d), ((1, 8, 8), nn.Conv2d), ((3, 1, 1), nn.Conv2d)],
)
def test_cnn_convolution_follows_input_rank(
    input_shape: tuple[int, ...], conv_type: type[nn.Module]
) -> None:
    model = create_model("cnn", input_shape=input_shape, num_outputs=4, channels=(8, 16))
    convs = [module for module in model.modules() if isinstance(module, nn.Conv1d | nn.Conv2d)]
    assert [type(conv) for conv in convs] == [conv_type, conv_type]
    assert convs[0].in_channels == input_shape[0]
    assert convs[-1].out_channels == 16
    assert _forward(model, input_shape).shape == (2, 4)


@pytest.mark.parametrize("input_shape", [(1, 40), (2, 9), (1, 8, 8), (3, 7, 5), (3, 1, 1)])
@pytest.mark.parametrize("kernel_size", [3, 4])
def test_cnn_flatten_head_maps_inputs_to_outputs(
    input_shape: tuple[int, ...], kernel_size: int
) -> None:
    model = create_model(
        "cnn",
        input_shape=input_shape,
        num_outputs=4,
        channels=(8, 16, 16),
        kernel_size=kernel_size,
        head="flatten",
    )
    assert not any(
        isinstance(m, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d) for m in model.modules()
    )
    assert _forward(model, input_shape).shape == (2, 4)


def test_cnn_flatten_head_reads_every_position() -> None:
    def hidden_inputs(input_shape: tuple[int, ...], head: str) -> int:
        model = create_model(
            "cnn", input_shape=input_shape, num_outputs=4, channels=(8, 16), head=head
        )
        return model.classifier[0].in_features

    # Two 2x2 pools: 40 -> 10 positions, 80 -> 20; 8x8 -> 2x2.
    assert hidden_inputs((1, 40), "flatten") == 16 * 10
    assert hidden_inputs((1, 80), "flatten") == 16 * 20
    assert hidden_inputs((1, 8, 8), "flatten") == 16 * 4
    assert hidden_inputs((1, 40), "avg") == hidden_inputs((1, 80), "avg") == 16

    def count(input_shape: tuple[int, ...]) -> int:
        model = create_model("cnn", input_shape=input_shape, num_outputs=4, head="flatten")
        return sum(parameter.numel() for parameter in model.parameters())

    assert count((1, 40)) < count((1, 80))


def test_cnn_rejects_an_unknown_head() -> None:
    with pytest.raises(ValueError, match="head"):
        create_model("cnn", input_shape=(1, 40), num_outputs=2, head="max")


@pytest.mark.parametrize("input_shape", [(4,), (1, 2, 8, 8)])
def test_cnn_rejects_other_ranks(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="rank 2 or 3"):
        create_model("cnn", input_shape=input_shape, num_outputs=2)


def test_mlp_hidden_widths() -> None:
    model = create_model("mlp", input_shape=(2, 3), num_outputs=5, hidden=(7,))
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(6, 7), (7, 5)]


def test_vgg16_has_no_batchnorm_and_the_reference_classifier() -> None:
    model = create_model("vgg16", input_shape=(1, 32, 32), num_outputs=10)
    assert not any(
        isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()
    )
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 13 and convs[0].in_channels == 1
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (512, 512),
        (512, 512),
        (512, 10),
    ]
    assert sum(isinstance(module, nn.Dropout) for module in model.modules()) == 2


@pytest.mark.parametrize(("small_input", "kernel_size"), [(True, (3, 3)), (False, (7, 7))])
def test_resnet18_stem(small_input: bool, kernel_size: tuple[int, int]) -> None:
    model = create_model(
        "resnet18", input_shape=(1, 16, 16), num_outputs=7, small_input=small_input
    )
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert model.conv1.in_channels == 1
    assert model.conv1.kernel_size == kernel_size
    assert isinstance(model.maxpool, nn.Identity) is small_input
    assert model.fc.out_features == 7


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_image_networks_reject_non_image_inputs(name: str) -> None:
    with pytest.raises(ValueError, match="rank 3"):
        create_model(name, input_shape=(1, 40), num_outputs=2)


def test_custom_architecture_is_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match="allow_custom=True / --allow-custom-architecture"):
        create_model(f"{__name__}:tiny_net", input_shape=(4,), num_outputs=2)


def test_custom_architecture_when_allowed() -> None:
    model = create_model(
        f"{__name__}:tiny_net", input_shape=(4,), num_outputs=2, allow_custom=True, bias=False
    )
    assert model[1].bias is None
    assert _forward(model, (4,)).shape == (2, 2)


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        (f"{__name__}:not_a_module", TypeError, "expected a torch.nn.Module"),
        (f"{__name__}:missing", ValueError, "cannot load custom architecture"),
        ("espro_no_such_module:build", ValueError, "cannot load custom architecture"),
    ],
)
def test_custom_architecture_errors(name: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        create_model(name, input_shape=(4,), num_outputs=2, allow_custom=True)


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'nope'; known: ") as info:
        create_model("nope", input_shape=(4,), num_outputs=2)
    assert all(name in str(info.value) for name in ARCHITECTURES)


@pytest.mark.parametrize(("input_shape", "num_outputs"), [((), 2), ((0, 3), 2), ((4,), 0)])
def test_invalid_shapes_are_rejected(input_shape: tuple[int, ...], num_outputs: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        create_model("mlp", input_shape=input_shape, num_outputs=num_outputs)


def test_register_architecture_keys_on_name_and_refuses_duplicates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry: dict[str, architectures.Builder] = {}
    monkeypatch.setattr(architectures, "ARCHITECTURES", registry)
    assert register_architecture(tiny_net) is tiny_net
    assert registry == {"tiny_net": tiny_net}
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(tiny_net)
