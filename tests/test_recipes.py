"""Recipes inherit: ``base: FILE`` (relative to the recipe) is read first, then the recipe's own
keys; the CIFAR family states only what differs from the CIFAR-10-LT ratio-100 recipe of its
schedule, and `dscl run --print-config` shows the resolved result."""

from pathlib import Path

import pytest
import yaml

from dscl.cli import main
from dscl.config import flatten_config, load_config
from dscl.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    load_config(CONFIGS / recipe)


def test_the_cifar_family_states_only_its_differences():
    bases = {"dscl-pbsd_resnet32_b128-cos-30e_cifar10-lt-r100.yaml",
             "dscl-pbsd_resnet32_b256-cos-200e_cifar10-lt-r100.yaml"}
    derived = [p for p in CONFIGS.glob("*_cifar1*-lt-r*.yaml") if p.name not in bases]
    assert len(derived) == 10
    for path in derived:
        values = yaml.safe_load(path.read_text())
        assert values["base"] in bases and set(values) == {"base", "data"}, path.name
        assert set(values["data"]) <= {"name", "root", "imbalance_ratio"}, path.name
        got = flatten_config(load_config(path).to_dict())
        base = flatten_config(load_config(CONFIGS / values["base"]).to_dict())
        assert {k for k in got if got[k] != base[k]} == {f"data.{k}" for k in values["data"]}, path.name


def test_a_chain_resolves_in_order_and_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("pretrain:\n  epochs: 7\n  lr: 0.5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\npretrain:\n  lr: 0.2\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\nseed: 3\n")
    cfg = load_config(tmp_path / "c.yaml", ["pretrain.epochs=9"])
    assert (cfg.pretrain.epochs, cfg.pretrain.lr, cfg.seed) == (9, 0.2, 3)
    (tmp_path / "a.yaml").write_text("pretrain:\n  epoch: 7\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown key .pretrain\.epoch."):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base sub/b\.yaml: .*missing\.yaml: cannot read config"):
        load_config(tmp_path / "c.yaml")


def test_print_config_shows_the_resolved_recipe(capsys):
    recipe = CONFIGS / "dscl-pbsd_resnet32_b128-cos-30e_cifar100-lt-r50.yaml"
    assert main(["run", "--config", str(recipe), "--set", "seed=4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(recipe, ["seed=4"]).to_dict()
    assert printed["data"]["name"] == "cifar100-lt" and printed["pretrain"]["epochs"] == 30
