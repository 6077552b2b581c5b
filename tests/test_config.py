"""Config validation: every error names the key and what is allowed."""

import pytest
import yaml

from diffalign.config import ConfigError, config_to_dict, load_config, parse_config, resolve_config_path

BASE = {
    "model": {"family": "sd", "tiny": True},
    "method": {"name": "sft"},
    "data": {"source": "world"},
}


def _with(**changes):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def test_valid_config_round_trips():
    cfg = parse_config(_with(optimization__lr="1e-4", rewards={"jpeg_compressibility": 1.0}))
    assert cfg.optimization.lr == 1e-4  # PyYAML reads "1e-4" as a string; accepted as a number
    again = parse_config(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize(
    "raw, message",
    [
        (_with(optimization__lrr=1e-4), r"optimization\.lrr: unknown key \(did you mean 'lr'\?\)"),
        (_with(optimisation={"lr": 1}), r"optimisation: unknown section \(did you mean 'optimization'\?\)"),
        (_with(method__bogus=1), r"method\.bogus: unknown key"),
        (_with(optimization__batch_size="eight"), r"optimization\.batch_size: expected an integer, got 'eight'"),
        (_with(optimization__lr="fast"), r"optimization\.lr: expected a number"),
        (_with(model__tiny="yes"), r"model\.tiny: expected true or false"),
        (_with(model__lora__target_modules="to_q"), r"model\.lora\.target_modules: expected a list"),
        (_with(optimization__lr=-1.0), r"optimization\.lr: must be > 0, got -1\.0"),
        (_with(model__lora__rank=0), r"model\.lora\.rank: must be a positive integer"),
        (_with(method__caption_dropout=1.5), r"method\.caption_dropout: must be in \[0, 1\]"),
        (_with(model__family="sd4"), r"model\.family: must be one of \['sd', 'sdxl', 'sd3', 'flux'\]"),
        (_with(model__tiny=False), r"model\.path: is required unless model\.tiny is true"),
        (_with(method__name="dpo2"), r"method\.name: unknown method 'dpo2'; available: "),
        (_with(data__source="folder"), r"data\.path: is required for data\.source 'folder'"),
        (_with(rewards={"clip": [1]}), r"rewards\.clip: expected a weight or a mapping"),
        ({"model": {"family": "sd", "tiny": True}}, r"method\.name: required"),
    ],
)
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_overrides_and_shipped_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["optimization.lr=3e-5", "model.lora.rank=16", "run_name=x", "data.split=heldout"])
    assert (cfg.optimization.lr, cfg.model.lora.rank, cfg.run_name, cfg.data.split) == (3e-5, 16, "x", "heldout")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["optimization.lr"])
    with pytest.raises(ConfigError, match=r"run\.yaml: optimization\.max_steps: must be > 0"):
        load_config(path, ["optimization.max_steps=0"])
    assert resolve_config_path("sft_tiny.yaml").parent.name == "configs"
    assert resolve_config_path("sft_tiny") == resolve_config_path("sft_tiny.yaml")
    with pytest.raises(ConfigError, match="no such file, and not a shipped config; shipped: .*sft_tiny.yaml"):
        resolve_config_path("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_set_takes_several_assignments_and_repeats():
    import argparse

    from diffalign.train import add_arguments

    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--cfg", "x.yaml", "--set", "optimization.lr=1e-3", "seed=1", "--set", "run_name=r"])
    assert args.overrides == ["optimization.lr=1e-3", "seed=1", "run_name=r"]


def test_reward_specs_allow_two_instances_of_one_plugin():
    cfg = parse_config(_with(rewards={"small": {"name": "clip", "weight": 0.5, "path": "/a"}, "jpeg_compressibility": 2}))
    assert cfg.rewards["small"].name == "clip" and cfg.rewards["small"].kwargs == {"path": "/a"}
    assert cfg.rewards["jpeg_compressibility"].weight == 2.0


def test_every_shipped_config_validates():
    from diffalign.config import configs_dir

    names = sorted(p.name for p in configs_dir().glob("*.yaml"))
    assert names
    for name in names:
        load_config(name)
