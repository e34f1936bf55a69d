import torch
from torch import nn

from training.batchnorm import batchnorm_buffer_names, recompute_batchnorm


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_batchnorm_buffer_names_lists_the_running_statistics():
    assert set(batchnorm_buffer_names(_model())) == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert batchnorm_buffer_names(nn.Linear(2, 2)) == ()


def test_recomputed_statistics_are_the_exact_average_over_the_batches():
    model = _model()
    params = {k: v.detach() * 2 for k, v in model.named_parameters()}  # a point nobody trained
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) + 3.0
    fresh = recompute_batchnorm(model, params, buffers, x.split(16))
    hidden = x @ params["0.weight"].T + params["0.bias"]
    torch.testing.assert_close(fresh["1.running_mean"], hidden.mean(0))
    # Equal batches: the running variance is the mean of the unbiased batch variances.
    batch_var = torch.stack([h.var(0) for h in hidden.split(16)]).mean(0)
    torch.testing.assert_close(fresh["1.running_var"], batch_var)
    assert int(fresh["1.num_batches_tracked"]) == 4
    # The statistics changed, the caller's buffers and the module's momentum did not.
    assert not torch.allclose(fresh["1.running_mean"], buffers["1.running_mean"])
    assert torch.equal(buffers["1.running_mean"], torch.zeros(4))
    assert model[1].momentum == 0.1


def test_only_the_batches_given_are_used():
    model = _model()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    x = torch.cat([torch.zeros(16, 3), torch.full((16, 3), 100.0)])
    fresh = recompute_batchnorm(model, params, buffers, x.split(16)[:1])
    with torch.no_grad():
        expected = model[0](torch.zeros(1, 3))[0]
    torch.testing.assert_close(fresh["1.running_mean"], expected)


def test_models_without_batchnorm_keep_their_buffers():
    model = nn.Linear(2, 2)
    model.register_buffer("scale", torch.tensor(3.0))
    fresh = recompute_batchnorm(
        model, dict(model.named_parameters()), {"scale": torch.tensor(3.0)}, [torch.randn(8, 2)]
    )
    assert fresh == {"scale": torch.tensor(3.0)}
