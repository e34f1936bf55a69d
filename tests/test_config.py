import pytest

from training.config import TrainConfig, builtin_configs, load_config, parse_config
from training.errors import ConfigError


def test_defaults_are_a_valid_config():
    config = parse_config({})
    assert config.modes.count == 3 and config.simplex.vertices == 2
    assert config.simplex.lam == TrainConfig().simplex.lam


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"simplex": {"epochs": 0}}, "simplex.epochs"),
        ({"modes": {"countt": 3}}, "modes.countt"),
        ({"modes": {"lr": "fast"}}, "modes.lr"),
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"model": {"architecture": "transformer"}}, "model"),
        ({"model": {"architecture": "mlp", "kwargs": {"widths": [8]}}}, "'widths'"),
        ({"calibration": {"coverage": 1.5}}, "calibration.coverage"),
        ({"simplex": {"lambda": -1}}, "simplex.lambda"),
        ({"seeed": 1}, "seeed"),
    ],
)
def test_errors_name_the_bad_field(data, field):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "my.yaml")
    assert str(err.value).startswith("my.yaml: ")
    assert field in str(err.value)


def test_custom_architectures_must_be_allowed():
    with pytest.raises(ConfigError, match="allow_custom"):
        parse_config({"model": {"architecture": "mypkg.models:build"}})
    config = parse_config({"model": {"architecture": "mypkg.models:build", "allow_custom": True}})
    assert config.model.architecture == "mypkg.models:build"


def test_yaml_and_toml_files_read_the_same(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 7\nsimplex:\n  lambda: 0.5\n  vertices: 1\n")
    (tmp_path / "c.toml").write_text("seed = 7\n[simplex]\nlambda = 0.5\nvertices = 1\n")
    assert load_config(tmp_path / "c.yaml") == load_config(tmp_path / "c.toml")
    assert load_config(tmp_path / "c.yaml").simplex.lam == 0.5


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"expected a \.yaml"):
        load_config(tmp_path / "c.json")
    (tmp_path / "bad.yaml").write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.yaml")


def test_builtin_configs_load_by_name():
    names = builtin_configs()
    assert "mnist1d-demo" in names
    for name in names:
        assert isinstance(load_config(name), TrainConfig)
