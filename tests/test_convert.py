"""Meta's DiT in this project's DiT: `dit_core.convert.from_meta` gives Meta's outputs exactly, DiT-XL/2's shapes give
its 674,834,720 parameters, `python -m dit_core.convert meta` writes a folder that evaluate's reader samples from and
run.init_from starts a run from, and bad inputs are one sentence.

The reference numbers were made once with Meta's own models.py (tools/meta_fixture.py; Meta's code is CC BY-NC and is
not in this repository): tests/fixtures/meta_dit/small.pt (a small DiT with random weights, its inputs and Meta's
outputs) and xl2_shapes.json (DiT-XL/2's keys and shapes)."""
import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dit_core.checkpoint import CheckpointError, model_from_checkpoint, read_training_state
from dit_core.config import ConfigError, load_config
from dit_core.convert import RENAME, convert_meta, from_meta, main
from dit_core.diffusion import Diffusion
from dit_core.model import DiT, count_parameters
from dit_core.process import run_main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "meta_dit"
XL2_PARAMETERS = 674_834_720


@pytest.fixture(scope="module")
def small():
    return torch.load(FIX / "small.pt", weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value."""
    return float((a - b).abs().max() / b.abs().max())


def project_dit(sd: dict, cfg) -> DiT:
    model = DiT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def meta_cfg_outputs(model: DiT, f: dict) -> torch.Tensor:
    """Our forward_with_cfg on the conditional half of Meta's doubled batch (Meta's sampler keeps that half)."""
    n = len(f["x"])
    return model.forward_with_cfg(f["cfg_x"][:n], f["cfg_t"][:n], f["cfg_y"][:n], f["cfg_scale"])


@torch.no_grad()
def test_meta_weights_give_metas_outputs(small):
    cfg, sd = from_meta(small["state_dict"], num_heads=4)
    assert (cfg.image_size, cfg.in_channels, cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_classes,
            cfg.learn_sigma, cfg.pos_embed) == (8, 4, 2, 32, 2, 10, True, "sincos_meta")
    model = project_dit(sd, cfg)
    out = model(small["x"], small["t"], small["y"])
    assert out.shape == small["forward"].shape == (4, 8, 8, 8)          # learn_sigma: 2 x 4 channels
    assert rel(out, small["forward"]) <= 1e-6
    n = len(small["x"])
    guided = meta_cfg_outputs(model, small)
    assert rel(guided, small["forward_with_cfg"][:n]) <= 1e-6
    # negative controls: the row-first sin-cos layout, and guidance on every channel, are not Meta's
    other = project_dit(sd, dataclasses.replace(cfg, pos_embed="sincos"))
    assert rel(other(small["x"], small["t"], small["y"]), small["forward"]) > 0.1
    cond = model(small["cfg_x"], small["cfg_t"], small["cfg_y"])
    c, u = cond.chunk(2)
    assert rel(u + small["cfg_scale"] * (c - u), small["forward_with_cfg"][:n]) > 0.1


def test_xl2_shapes_give_metas_parameter_count_and_the_preset():
    meta = json.loads((FIX / "xl2_shapes.json").read_text())
    assert meta["trainable_parameters"] == XL2_PARAMETERS
    sd = {k: torch.empty(v, device="meta") for k, v in meta["shapes"].items()}
    cfg, ours = from_meta(sd)                       # heads from Meta's presets: XL -> 16
    assert cfg == load_config(ROOT / "configs" / "dit_xl2.yaml").model
    with torch.device("meta"):
        model = DiT(cfg)
    assert count_parameters(model) == XL2_PARAMETERS
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {RENAME.get(k, k): tuple(v) for k, v in meta["shapes"].items() if k != "pos_embed"}
    for name, (hidden, depth, heads) in {"s2": (384, 12, 6), "b2": (768, 12, 12), "l2": (1024, 24, 16),
                                         "xl2": (1152, 28, 16)}.items():
        m = load_config(ROOT / "configs" / f"dit_{name}.yaml").model
        assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.image_size, m.in_channels, m.num_classes,
                m.learn_sigma, m.pos_embed) == (hidden, depth, heads, 2, 32, 4, 1000, True, "sincos_meta")


def one_sentence(argv, capsys, out: list | None = None) -> tuple[int, str]:
    """`python -m dit_core.convert ARGV` in this process: (exit code, its one line on stderr); stdout into `out`."""
    capsys.readouterr()
    try:
        run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    got = capsys.readouterr()
    err = [line for line in got.err.splitlines() if line.strip()]
    assert len(err) <= 1, err
    if out is not None:
        out.append(got.out)
    return code, err[0] if err else ""


@torch.no_grad()
def test_the_cli_writes_a_folder_that_evaluate_reads(small, tmp_path, capsys):
    src = tmp_path / "meta.pt"
    torch.save(small["state_dict"], src)
    said = []
    code, err = one_sentence(["meta", src, tmp_path / "out", "--num-heads", "4"], capsys, said)
    assert (code, err) == (0, "")
    assert said == [f"wrote {tmp_path / 'out'} (model.pt, ema.pt, training_state.json): a DiT of hidden size 32, "
                    f"depth 2, 4 heads, patch 2, 51,168 parameters, 8x8x4 inputs, 10 classes; fine-tune it with --set "
                    f"run.init_from={tmp_path / 'out'}\n"]
    state = read_training_state(tmp_path / "out")                    # verified against its manifest
    assert (state["step"], state["weights_only"]) == (0, True)
    model, cfg = model_from_checkpoint(tmp_path / "out")             # what python -m dit_core.evaluate reads
    assert rel(model(small["x"], small["t"], small["y"]), small["forward"]) <= 1e-6
    labels = torch.tensor([0, 9])
    images = Diffusion(cfg.diffusion).sample(model, labels, cfg_scale=4.0, steps=3)
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()
    # a train.py checkpoint: "model" to model.pt, "ema" to ema.pt (its argparse Namespace is read, weights only)
    raw = {k: v + 0.01 if v.is_floating_point() and k != "pos_embed" else v for k, v in small["state_dict"].items()}
    torch.save({"model": raw, "ema": small["state_dict"], "opt": {}, "args": argparse.Namespace(model="tiny")},
               tmp_path / "train.pt")
    convert_meta(tmp_path / "train.pt", tmp_path / "out2", num_heads=4)
    assert torch.equal(torch.load(tmp_path / "out2" / "model.pt")["blocks.0.attn.qkv.weight"],
                       raw["blocks.0.attn.qkv.weight"])
    assert torch.equal(torch.load(tmp_path / "out2" / "ema.pt")["x_embedder.weight"],
                       small["state_dict"]["x_embedder.proj.weight"])


def test_bad_inputs_are_one_sentence(small, tmp_path, capsys):
    sd = small["state_dict"]
    ours = tmp_path / "ours.pt"
    torch.save(from_meta(sd, num_heads=4)[1], ours)
    cases = {
        "missing.pt": "does not exist",
        "ours.pt": "is already this project's layout (x_embedder.weight, not Meta's x_embedder.proj.weight); it needs "
                   "no conversion",
        "other.pt": "is not a Meta DiT state dict: it has no x_embedder.proj.weight (1 entries, the first 'w'); pass "
                    "DiT-XL-2-256x256.pt",
        "noheads.pt": "is a DiT of hidden size 32 and depth 2, none of Meta's presets (S 384/12, B 768/12, L 1024/24, "
                      "XL 1152/28), and its number of heads cannot be read from its shapes; give it (num_heads=N, or "
                      "--num-heads N).",
        "shape.pt": "holds final_layer.linear.weight with 20 outputs, but patch 2 and 4 channels give 16 (the noise) "
                    "or 32 (learn_sigma: noise and variance)",
        "pos.pt": "holds a pos_embed that differs from Meta's fixed sin-cos embedding by up to",
        "text.pt": "cannot be read as a PyTorch file",
    }
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    torch.save(sd, tmp_path / "noheads.pt")
    torch.save({**sd, "final_layer.linear.weight": torch.zeros(20, 32), "final_layer.linear.bias": torch.zeros(20)},
               tmp_path / "shape.pt")
    torch.save({**sd, "pos_embed": sd["pos_embed"].flip(-1)}, tmp_path / "pos.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, words in cases.items():
        extra = [] if name == "noheads.pt" else ["--num-heads", "4"]
        code, err = one_sentence(["meta", tmp_path / name, tmp_path / f"out-{name}", *extra], capsys)
        assert code == 2 and words in err and err.startswith(f"error: '{tmp_path / name}'"), (name, err)
        assert not (tmp_path / f"out-{name}").exists()
    torch.save(sd, tmp_path / "good.pt")
    (tmp_path / "taken").mkdir()
    code, err = one_sentence(["meta", tmp_path / "good.pt", tmp_path / "taken", "--num-heads", "4"], capsys)
    assert (code, err) == (2, f"error: '{tmp_path / 'taken'}' already exists; pass a new folder to write the "
                              f"converted checkpoint into.")


# ---------------------------------------------------------------- run.init_from

def to_meta(model: DiT) -> dict:
    """This project's DiT (sincos_meta) in Meta's layout: names back, pos_embed as Meta saves it."""
    back = {v: k for k, v in RENAME.items()}
    sd = {back.get(k, k): v.clone() for k, v in model.state_dict().items()}
    return {"pos_embed": model.pos_embed.clone(), **sd}


def test_init_from_starts_a_run_from_the_weights(micro_cfg, tmp_path):
    from conftest import perturbed_dit
    from dit_core.train import train
    meta = dict(model__pos_embed="sincos_meta", model__learn_sigma=True)
    src = perturbed_dit(micro_cfg(**meta))
    torch.save(to_meta(src), tmp_path / "meta.pt")
    folder, _ = convert_meta(tmp_path / "meta.pt", tmp_path / "conv", num_heads=2)      # MICRO: 2 heads
    want = torch.load(folder / "model.pt")
    assert want.keys() == src.state_dict().keys()
    # step 0 only: the saved weights and EMA are the converted ones, bit for bit (a fresh run's are not)
    train(micro_cfg(**meta, train__max_steps=0, run__init_from=str(folder)), quiet=True)
    got = torch.load(tmp_path / "run" / "checkpoint-0" / "model.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, want[k]) for k, v in torch.load(tmp_path / "run" / "checkpoint-0" / "ema.pt").items())
    fresh = train(micro_cfg(**meta, train__max_steps=0, run__results_dir=str(tmp_path / "fresh")), quiet=True)
    assert not torch.equal(fresh.model.state_dict()["blocks.0.attn.qkv.weight"], want["blocks.0.attn.qkv.weight"])
    # two steps from there: step 0 first (a new run, fresh optimizer), the learn_sigma loss reads the noise channels
    res = train(micro_cfg(**meta, train__max_steps=2, run__init_from=str(folder),
                          run__results_dir=str(tmp_path / "two")), quiet=True)
    rows = [json.loads(r) for r in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and res.steps == 2
    # refusals: another model, and init_from with a resume
    with pytest.raises(CheckpointError, match=r"was trained with a different model \(model.pos_embed: checkpoint "
                                              r"'sincos_meta' vs config 'sincos'; model.learn_sigma: checkpoint True "
                                              r"vs config False\)"):
        train(micro_cfg(train__max_steps=1, run__init_from=str(folder), run__results_dir=str(tmp_path / "x")),
              quiet=True)
    with pytest.raises(ConfigError, match=r"^run.init_from='.*' starts a new run from a checkpoint's weights, but "
                                          r"run.resume='.*' continues a run that did not start from them; give one "
                                          r"of them.$"):
        train(micro_cfg(**meta, train__max_steps=3, run__init_from=str(folder),
                        run__resume=str(tmp_path / "fresh" / "checkpoint-0"), run__results_dir=str(tmp_path / "fresh")),
              quiet=True)
    # the run that started from them continues (a requeued fine-tune: --resume auto finds its checkpoint), however
    # the same folder is spelled
    res = train(micro_cfg(**meta, train__max_steps=3, run__init_from=str(folder) + "/",
                          run__resume=str(tmp_path / "two" / "checkpoint-2"), run__results_dir=str(tmp_path / "two")),
                quiet=True)
    rows = [json.loads(r) for r in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and res.steps == 3
    with pytest.raises(CheckpointError, match=r"holds weights only \(no optimizer state, step 0; converted from "
                                              r"'.*meta.pt'\), which no run continues; start a new run from them with "
                                              r"--set run.init_from=.*conv\.$"):
        train(micro_cfg(**meta, train__max_steps=1, run__resume=str(folder), run__results_dir=str(tmp_path / "y")),
              quiet=True)


def test_accelerate_starts_from_the_weights_as_the_loop_does(tmp_path):
    """Accelerate's own loop honours run.init_from too (it once ignored it): one process of launchers/accelerate.py
    is the single run exactly, both started from the same converted weights; a fresh start is not."""
    from conftest import launcher_flags, perturbed_dit, run_py
    from dit_core.cli import config_from_args, launcher_parser
    from dit_core.parity import read_jsonl
    meta = {"model.pos_embed": "sincos_meta", "model.learn_sigma": True}
    cfg = config_from_args(launcher_parser("t").parse_args(launcher_flags(3, **meta)))
    torch.save(to_meta(perturbed_dit(cfg)), tmp_path / "meta.pt")
    folder, _ = convert_meta(tmp_path / "meta.pt", tmp_path / "conv", num_heads=cfg.model.num_heads)
    logs = {}
    for name, script, init in (("single", "launchers/single.py", True), ("accelerate", "launchers/accelerate.py", True),
                               ("fresh", "launchers/single.py", False)):
        args = launcher_flags(3, **meta, **({"run.init_from": str(folder)} if init else {}))
        r = run_py([script, *args, "--results-dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-2000:]
        logs[name] = read_jsonl(tmp_path / name / "log.jsonl")
    assert logs["accelerate"] == logs["single"]                       # every field of every step, bitwise
    assert logs["fresh"][0]["loss"] != logs["single"][0]["loss"]      # the weights made the difference
