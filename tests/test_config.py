import pytest

from conftest import run_py
from dit_core.config import ConfigError, config_fields, load_config, parse_overrides


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
    ("train:\n  lr: -1\n", ["train.lr=-1", "must be > 0"]),
    ("train:\n  lr: true\n", ["train.lr=True", "not a number"]),
    ("train:\n  max_steps: .inf\n", ["train.max_steps=inf", "not finite"]),
    ("model:\n  mlp_ratio: 0.001\n", ["mlp_ratio=0.001", "0 hidden units"]),
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


# A value of the wrong type for each kind of field (a boolean is not a number; a list is not a word).
WRONG_TYPE = {int: ["abc", True, 2.5, "inf"], float: ["abc", True, "nan", "-inf"], bool: ["maybe", 3],
              str: [["a", "b"], {"k": 1}], tuple: ["x,y", [0.9, True], [0.9, float("nan")]]}
FIELDS = list(config_fields())


@pytest.mark.parametrize("section, key, typ, rule", FIELDS, ids=[f"{s}.{k}" for s, k, _, _ in FIELDS])
def test_every_field_refuses_a_wrong_type_and_an_out_of_range_value(section, key, typ, rule):
    """Driven by the dataclass fields: a field added without a rule fails at import, and here each one
    is tried with wrong types and with its rule's out-of-range example."""
    load_config(None, {})                                 # the defaults pass their own rules
    free = rule.bad is None
    assert not (free and (typ in (int, float, tuple) or rule.need.startswith("one of"))), \
        f"{section}.{key} accepts every value of its type; give its Rule an out-of-range example"
    for value in WRONG_TYPE[typ] + ([] if free else [rule.bad]):
        with pytest.raises(ConfigError) as e:
            load_config(None, {f"{section}.{key}": value})
        msg = str(e.value)
        assert "\n" not in msg and f"{section}.{key}=" in msg, (value, msg)
