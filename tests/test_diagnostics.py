import pytest
import torch
from torch import nn

from serving.manifest import InputSpec, Task
from serving.simplex import sample_dirichlet
from training.diagnostics import SimplexDiagnostics, diagnose, diagnostics_table
from training.espro import Draw, TrainedSimplex
from training.splits import TensorSplit
from training.spro import OptimSettings, SimplexTrainer

SPEC = InputSpec(shape=(4,), mean=(0.0,) * 4, std=(1.0,) * 4)


def _data(n: int, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()) % 3
    return TensorSplit(x, y)


def _simplex(lam: float, epochs: int, lr: float) -> tuple[nn.Module, TrainedSimplex, list[Draw]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    trainer = SimplexTrainer(model, Task.CLASSIFICATION, lam=lam, samples=3)
    train = _data(256, 0)
    trainer.fit_mode(train, OptimSettings(epochs=20, lr=0.1), torch.Generator())
    for _ in range(2):
        trainer.add_vertex(train, OptimSettings(epochs=epochs, lr=lr), torch.Generator())
    simplex = TrainedSimplex(trainer.vertices, trainer.buffers, [])
    alphas = sample_dirichlet(3, 6, torch.Generator().manual_seed(1))
    return model, simplex, [Draw(tuple(a.tolist()), {}) for a in alphas]


def _diagnose(lam: float, epochs: int, lr: float) -> SimplexDiagnostics:
    model, simplex, draws = _simplex(lam, epochs, lr)
    return diagnose(Task.CLASSIFICATION, model, simplex, draws, _data(256, 0), _data(256, 1), SPEC)


def test_a_simplex_that_never_left_its_mode_is_degenerate():
    d = _diagnose(lam=0.0, epochs=1, lr=1e-6)
    assert d.diversity < 0.005
    assert max(d.edge_lengths) < 1e-3
    assert any(w.startswith("degenerate") for w in d.warnings)
    assert not any(w.startswith("broken") for w in d.warnings)


def test_a_simplex_pushed_into_high_loss_is_broken():
    d = _diagnose(lam=1e4, epochs=3, lr=0.1)
    assert d.val.draw_loss_worst > 1.5 * d.val.mode_loss
    assert any(w.startswith("broken") for w in d.warnings)


def test_a_reasonable_simplex_raises_no_warning_and_is_measured():
    d = _diagnose(lam=0.05, epochs=10, lr=0.05)
    assert d.warnings == []
    assert len(d.edge_lengths) == 3 and d.log_volume is not None
    assert 0.0 < d.diversity < 0.5
    assert d.train.mode_accuracy is not None and d.val.draw_accuracy_worst is not None
    assert d.val.draw_accuracy_worst <= d.val.draw_accuracy_mean
    table = diagnostics_table([d, SimplexDiagnostics.model_validate(d.model_dump())])
    assert table.count("\n") == 3 and "| 1 |" in table


def test_a_lone_mode_has_no_edges_and_no_warnings():
    model, simplex, _ = _simplex(lam=0.0, epochs=1, lr=1e-6)
    lone = TrainedSimplex(simplex.vertices[:1], simplex.buffers, [])
    d = diagnose(
        Task.CLASSIFICATION, model, lone, [Draw((1.0,), {})], _data(64, 0), _data(64, 1), SPEC
    )
    assert d.edge_lengths == [] and d.log_volume is None and d.warnings == []


def test_regression_diversity_is_in_target_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorSplit(torch.randn(64, 4), torch.randn(64) * 5)
    trainer = SimplexTrainer(model, Task.REGRESSION)
    trainer.fit_mode(data, OptimSettings(epochs=2, lr=0.01), torch.Generator())
    simplex = TrainedSimplex(trainer.vertices * 2, trainer.buffers, [])
    d = diagnose(Task.REGRESSION, model, simplex, [Draw((0.5, 0.5), {})], data, data, SPEC)
    assert d.diversity == pytest.approx(0.0, abs=1e-6)
    assert d.val.mode_accuracy is None
    assert any(w.startswith("degenerate") for w in d.warnings)
