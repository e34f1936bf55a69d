import pytest
import torch
from torch import nn

from serving.manifest import Task
from training.splits import TensorSplit, minibatches
from training.spro import EarlyStopping, OptimSettings, SimplexTrainer, task_loss
from training.volume import squared_distances, squared_height


def _problem(seed: int = 0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorSplit(x, y)


def _trainer(lam: float = 0.0, bn: bool = False) -> SimplexTrainer:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(16))
    return SimplexTrainer(nn.Sequential(*layers), Task.CLASSIFICATION, lam=lam, samples=3)


def _fit(trainer: SimplexTrainer, vertices: int, lr: float = 0.1, epochs: int = 5) -> None:
    data = _problem()
    trainer.fit_mode(data, OptimSettings(epochs=epochs, lr=lr), torch.Generator().manual_seed(1))
    for j in range(vertices):
        trainer.add_vertex(
            data, OptimSettings(epochs=epochs, lr=lr), torch.Generator().manual_seed(2 + j)
        )


def test_fit_mode_lowers_the_loss():
    trainer = _trainer()
    data = _problem()
    before = task_loss(Task.CLASSIFICATION, trainer.model(data.x), data.y).item()
    history = trainer.fit_mode(
        data, OptimSettings(epochs=10, lr=0.1), torch.Generator().manual_seed(0)
    )
    assert history.loss[-1] < 0.7 * before
    assert trainer.order == 0


def test_gradients_reach_only_the_vertex_being_trained():
    trainer = _trainer(lam=0.1)
    _fit(trainer, vertices=1)
    # Frozen vertices handed in as leaves that require grad must receive no gradient.
    frozen = [{k: v.clone().requires_grad_(True) for k, v in vx.items()} for vx in trainer.vertices]
    spy = SimplexTrainer(trainer.model, Task.CLASSIFICATION, lam=0.1, samples=3, vertices=frozen)
    before = [{k: v.detach().clone() for k, v in vx.items()} for vx in frozen]
    data = _problem()
    spy.add_vertex(data, OptimSettings(epochs=2, lr=0.1), torch.Generator().manual_seed(5))
    assert all(v.grad is None for vx in frozen for v in vx.values())
    for old, new in zip(before, spy.vertices[:2], strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert not torch.equal(spy.vertices[2]["0.weight"], spy.vertices[0]["0.weight"])
    assert spy.order == 2


def test_new_vertex_starts_at_the_centroid():
    trainer = _trainer()
    _fit(trainer, vertices=1)
    centroid = {
        k: (trainer.vertices[0][k] + trainer.vertices[1][k]) / 2 for k in trainer.vertices[0]
    }
    data = _problem()
    trainer.add_vertex(
        data,
        OptimSettings(epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0),
        torch.Generator().manual_seed(0),
    )
    for k, v in centroid.items():
        torch.testing.assert_close(trainer.vertices[2][k], v)


def test_volume_term_grows_the_simplex():
    heights = []
    for lam in (0.0, 0.5):
        trainer = _trainer(lam=lam)
        _fit(trainer, vertices=1)
        heights.append(squared_height(squared_distances(trainer.vertices)).item())
    assert heights[1] > 2 * heights[0]


def test_add_vertex_needs_a_mode_and_fit_mode_runs_once():
    trainer = _trainer()
    data = _problem()
    with pytest.raises(RuntimeError, match="fit_mode"):
        trainer.add_vertex(data, OptimSettings(epochs=1, lr=0.1), torch.Generator())
    _fit(trainer, vertices=0, epochs=1)
    with pytest.raises(RuntimeError, match="already trained"):
        trainer.fit_mode(data, OptimSettings(epochs=1, lr=0.1), torch.Generator())


def test_mode_training_updates_batchnorm_but_new_vertices_do_not():
    trainer = _trainer(bn=True)
    initial = trainer.buffers["1.running_mean"].clone()
    _fit(trainer, vertices=0)
    after_mode = trainer.buffers["1.running_mean"].clone()
    assert not torch.equal(initial, after_mode)
    data = _problem()
    trainer.add_vertex(data, OptimSettings(epochs=2, lr=0.1), torch.Generator().manual_seed(0))
    assert torch.equal(trainer.buffers["1.running_mean"], after_mode)


def test_regression_loss_is_gaussian_nll():
    outputs = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    targets = torch.tensor([0.5, 1.0])
    var = torch.nn.functional.softplus(outputs[:, 1]) + 1e-6
    expected = (0.5 * (torch.log(2 * torch.pi * var) + (targets - outputs[:, 0]) ** 2 / var)).mean()
    torch.testing.assert_close(task_loss(Task.REGRESSION, outputs, targets), expected)


def test_minibatches_cover_every_row_once():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in minibatches(x, y, 3, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lam"):
        SimplexTrainer(nn.Linear(2, 2), Task.CLASSIFICATION, lam=-1.0)


class _Held:
    """A held-out split as :class:`training.spro.EarlyStopping` reads it."""

    def __init__(self, split: TensorSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def labelled(self, batch_size: int):
        return self.split.batches(batch_size)


def test_a_mode_stops_early_and_keeps_its_best_epoch(monkeypatch):
    trainer = _trainer(bn=True)
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.4])
    seen = []

    def scripted(self, params, buffers, stopping):
        seen.append(
            (
                {k: v.detach().clone() for k, v in params.items()},
                {k: v.clone() for k, v in buffers.items()},
            )
        )
        return next(losses)

    monkeypatch.setattr(SimplexTrainer, "_validation_loss", scripted)
    held = _Held(_problem(1))
    history = trainer.fit_mode(
        _problem(),
        OptimSettings(epochs=20, lr=0.1, batch_size=64),
        torch.Generator().manual_seed(1),
        stopping=EarlyStopping(held, patience=2),
    )
    # Epoch 2 was best; epochs 3 and 4 did not improve on it, so epoch 5 never ran.
    assert history.epochs == 4 and history.best_epoch == 2
    assert history.val_loss == [1.0, 0.5, 0.6, 0.7]
    assert history.passes == 4 * 256 and history.forward == 4 * 256
    best_params, best_buffers = seen[1]
    assert all(torch.equal(trainer.vertices[0][k], v) for k, v in best_params.items())
    assert all(torch.equal(trainer.buffers[k], v) for k, v in best_buffers.items())


def test_the_validation_loss_is_the_mean_task_loss_in_eval_mode():
    trainer = _trainer(bn=True)
    held = _problem(1)
    trainer.fit_mode(_problem(), OptimSettings(epochs=2, lr=0.1), torch.Generator())
    params, buffers = trainer.vertices[0], trainer.buffers
    loss = trainer._validation_loss(params, buffers, EarlyStopping(_Held(held), 1, batch_size=100))
    model = trainer.model
    model.load_state_dict({**params, **buffers})
    model.eval()
    with torch.no_grad():
        expected = task_loss(Task.CLASSIFICATION, model(held.x), held.y).item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_passes_count_every_sample_of_a_spro_step():
    trainer = _trainer()
    data = _problem()
    mode = trainer.fit_mode(data, OptimSettings(epochs=3, lr=0.1), torch.Generator())
    vertex = trainer.add_vertex(data, OptimSettings(epochs=2, lr=0.1), torch.Generator())
    assert (mode.passes, mode.forward, mode.epochs) == (3 * 256, 0, 3)
    assert (vertex.passes, vertex.epochs) == (2 * 3 * 256, 2)
