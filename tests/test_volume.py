import math

import pytest
import torch

from training.volume import (
    log_volume,
    log_volume_from_distances,
    squared_distances,
    squared_height,
)


def _points(*coords: tuple[float, ...]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(c, dtype=torch.float32)} for c in coords]


def test_unit_right_triangle_has_area_one_half():
    vertices = _points((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))
    assert math.exp(log_volume(vertices)) == pytest.approx(0.25, rel=1e-12)


def test_regular_tetrahedron_matches_closed_form():
    vertices = _points((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1))
    edge = 2 * math.sqrt(2)  # all edges of this tetrahedron
    expected = edge**3 / (6 * math.sqrt(2))
    assert math.exp(0.5 * log_volume(vertices)) == pytest.approx(expected, rel=1e-10)


def test_segment_volume_is_its_length():
    vertices = _points((0.0, 0.0, 0.0), (3.0, 4.0, 0.0))
    assert math.exp(log_volume(vertices)) == pytest.approx(25.0)


def test_degenerate_simplex_has_zero_volume():
    collinear = _points((0.0, 0.0), (1.0, 1.0), (2.0, 2.0))
    assert log_volume(collinear) == -math.inf
    coincident = _points((1.0, 2.0), (1.0, 2.0))
    assert log_volume(coincident) == -math.inf


def test_volume_is_accurate_for_huge_and_tiny_scales():
    # A unit right triangle scaled by s has V² = s⁴ / 4, far outside float32's range here.
    for scale in (1e-30, 1e30):
        d = squared_distances(_points((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))) * scale**2
        assert log_volume_from_distances(d).item() == pytest.approx(
            math.log(0.25) + 4 * math.log(scale), rel=1e-9
        )


def test_squared_distances_cover_every_parameter():
    a = {"w": torch.zeros(3), "b": torch.zeros(2)}
    b = {"w": torch.ones(3), "b": torch.full((2,), 2.0)}
    d = squared_distances([a, b])
    assert d.dtype == torch.float64
    assert d.tolist() == [[0.0, 11.0], [11.0, 0.0]]


def test_squared_height_is_distance_to_the_opposite_face():
    # Apex at height 3 above the unit right triangle in the z = 0 plane.
    d = squared_distances(_points((0, 0, 0), (1, 0, 0), (0, 1, 0), (0.2, 0.3, 3.0)))
    assert squared_height(d).item() == pytest.approx(9.0, rel=1e-10)
    assert squared_height(d[:2, :2]).item() == pytest.approx(1.0)


def test_squared_height_gradient_moves_only_the_apex_away():
    base = _points((0.0, 0.0), (1.0, 0.0))
    apex = {"w": torch.tensor([0.5, 0.1], requires_grad=True)}
    squared_height(squared_distances([*base, apex])).backward()
    grad = apex["w"].grad
    assert grad[0].abs() < 1e-9  # moving along the base does not change the height
    assert grad[1] > 0  # moving up increases it


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square matrix"):
        log_volume_from_distances(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="degenerate"):
        squared_height(squared_distances(_points((0.0,), (0.0,), (1.0,))))
