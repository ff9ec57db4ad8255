import pytest

from conftest import run_py
from dit_core.config import ConfigError, load_config, parse_overrides


def test_defaults_and_yaml_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  depth: 3\ntrain:\n  lr: 2.0e-4\n  betas: [0.9, 0.95]\n")
    cfg = load_config(p, {"train.max_steps": "7"})
    assert cfg.model.depth == 3 and cfg.train.lr == 2e-4 and cfg.train.max_steps == 7
    assert cfg.train.betas == (0.9, 0.95)


@pytest.mark.parametrize("yaml_text, words", [
    ("model:\n  hiden_size: 64\n", ["model.hiden_size", "valid keys"]),
    ("modle:\n  depth: 2\n", ["modle", "valid sections"]),
    ("model:\n  depth: two\n", ["model.depth='two'", "whole number"]),
    ("model:\n  hidden_size: 100\n  num_heads: 3\n", ["hidden_size=100", "num_heads=3"]),
    ("model:\n  patch_size: 5\n", ["patch_size=5", "divide"]),
    ("train:\n  precision: fp8\n", ["train.precision='fp8'", "fp32, bf16, fp16"]),
    ("train:\n  global_batch_size: 10\n  grad_accum: 4\n", ["global_batch_size=10", "grad_accum=4"]),
    ("train:\n  lr: -1\n", ["train.lr=-1", "positive"]),
    ("train: 5\n", ["section 'train'", "mapping"]),
    ("model: [1, 2\n", ["not valid YAML"]),
])
def test_bad_config_names_value_and_fix(tmp_path, yaml_text, words):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(None, {"train.nope": 1})


def test_launcher_bad_input_is_one_sentence_and_exit_2():
    r = run_py(["launchers/single.py", "--config", "configs/tiny.yaml", "--set", "model.num_heads=5"])
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "num_heads=5" in lines[0], r.stderr
