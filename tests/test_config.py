import pytest

from geolocate.config import Config, ConfigError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\nindex:\n  h3_resolution: 2\n")
    cfg = Config.load(p, ["train.lr=0.5", "source.earth.imagery=bmng", "train.class_weights=true"])
    assert cfg.train.epochs == 7 and cfg.index.h3_resolution == 2
    assert cfg.train.lr == 0.5 and cfg.source.earth.imagery == ["bmng"] and cfg.train.class_weights is True
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nloss = 'ce'\n")
    assert Config.load(p).train.loss == "ce"


@pytest.mark.parametrize("override,needle", [
    ("train.epochz=3", "valid keys at train: epochs"),
    ("nope.x=1", "valid keys at top level: paths, source"),
    ("train.epochs=abc", "expects int"),
    ("train.loss=mse", "train.loss must be one of ['adjacency', 'ce', 'geo']"),
    ("train", "must look like section.key=value"),
    ("index.split_ratios=0.5,0.5,0.5", "summing to 1"),
    ("train=3", "is a section"),
])
def test_bad_overrides_name_valid_keys(override, needle):
    with pytest.raises(ConfigError) as e:
        Config.load(None, [override])
    assert needle in str(e.value)


def test_bad_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'.*epochs"):
        Config.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="does not parse"):
        Config.load(tmp_path / "bad.yaml")
