"""The mixture-of-experts DiT and expert parallelism: the layer against its closed form, the balance loss, the
layout checks, and real processes (torchrun, gloo, CPU) against the single-process MoE run."""
import pytest
import torch

from conftest import PARITY_STEPS as STEPS
from conftest import assert_parity, declare, job_dir, parity_flags
from dit_core.config import ConfigError, load_config
from dit_core.model import DiT
from dit_core.moe import MoEMlp, balance_loss, moe_layers
from dit_core.parallel.expert import check_expert_parallel

# The parity DiT with 4 experts of half the dense width, top-2 (configs/moe.yaml's shape, small).
MOE = {"model.num_experts": 4, "model.top_k": 2, "model.mlp_ratio": 2.0}
D = job_dir() / "moe"
_M = "launchers/moe.py"
LAYOUTS = {"ep 2": (2, 2), "ep 4": (4, 4), "dp 2 x ep 2": (4, 2)}
for name, (n, p) in LAYOUTS.items():
    for a in (1, 2):
        declare(n, f"moe {name} a{a}", _M, parity_flags(**MOE, **{"train.grad_accum": a}) +
                ["--ep-degree", p, "--results-dir", D / f"{name} a{a}".replace(" ", "-")])
# A checkpoint at step 10, resumed by the same layout (the next row), and by bad layouts (one sentence each).
CK = parity_flags(**MOE, **{"train.ckpt_every": 10})
declare(2, "moe ckpt", _M, CK + ["--ep-degree", 2, "--results-dir", D / "ckpt"])
declare(2, "moe resumed", _M, CK + ["--ep-degree", 2, "--results-dir", D / "resumed", "--resume", D / "ckpt" / "checkpoint-10"])
declare(2, "moe resumed by ep 1", _M, CK + ["--ep-degree", 1, "--results-dir", D / "bad-ep", "--resume", D / "ckpt" / "checkpoint-10"])
declare(2, "moe E % P", _M, parity_flags(**{**MOE, "model.num_experts": 3, "model.top_k": 1}) + ["--ep-degree", 2, "--results-dir", D / "e3"])
declare(2, "moe on ddp", "launchers/ddp.py", parity_flags(**MOE) + ["--results-dir", D / "ddp"])
declare(4, "expert checks", "tests/expert_checks.py", [])


def moe_cfg(**over):
    return load_config("configs/tiny.yaml", {"model.hidden_size": 32, "model.depth": 2, **MOE, **over})


def test_dense_is_unchanged_by_default():
    torch.manual_seed(0)
    m = DiT(load_config("configs/tiny.yaml").model)
    assert not moe_layers(m) and not any("router" in n or n.endswith(".w1") for n, _ in m.named_parameters())


def test_moe_layer_is_the_weighted_sum_of_each_tokens_top_k_experts():
    torch.manual_seed(0)
    moe = MoEMlp(8, 12, num_experts=4, top_k=2, group=1)
    torch.nn.init.normal_(moe.router.weight)
    moe.reset_experts()
    x = torch.randn(3, 5, 8)
    out = moe(x).reshape(-1, 8)
    for t, xt in enumerate(x.reshape(-1, 8)):        # one token at a time, straight from the definition
        p = torch.softmax(moe.router(xt), -1)
        top = p.topk(2)
        want = sum(wk / top.values.sum() * (moe.act(xt @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e])
                   for wk, e in zip(top.values, top.indices))
        assert torch.allclose(out[t], want, atol=1e-6), t


def test_balance_loss_closed_form():
    moe = MoEMlp(8, 12, num_experts=4, top_k=2, group=1)
    torch.nn.init.zeros_(moe.router.weight)          # every probability 1/4; top-2 of ties: the same two experts
    moe(torch.randn(2, 6, 8))
    counts, prob_sum = moe.stats
    assert [sorted(c) for c in counts.tolist()] == [[0, 0, 6, 6]] * 2
    assert torch.allclose(prob_sum, torch.full((2, 4), 1.5))
    # f = (1/2, 1/2, 0, 0) in some order, P = 1/4 each: 4 * (2 * 1/2 * 1/4) = 1
    assert balance_loss(moe).item() == pytest.approx(1.0)
    # a router that sends every token to experts 0 and 1 with probability ~1/2 each: 4 * 2 * (1/2)^2 = 2
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = 50.0
    x = torch.randn(1, 6, 8).abs() + 1
    moe(x)
    assert balance_loss(moe).item() == pytest.approx(2.0, rel=1e-4)


def test_balance_loss_gradient_reaches_everything_before_the_last_router():
    """The balance loss is not the router's alone: the router's input (the block's modulated hidden state) is not
    detached, so its gradient reaches attention, adaLN, the embedders and earlier blocks' experts; only what acts
    after the last router (its block's experts, the final layer) gets none. Chapter 15, section 3, measures it."""
    from conftest import perturbed_dit
    cfg = moe_cfg()
    model = perturbed_dit(cfg)          # off adaLN-Zero's init: every gate open, so earlier experts feed later routers
    g = torch.Generator().manual_seed(0)
    model(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 1000, (4,), generator=g),
          torch.randint(0, 10, (4,), generator=g))
    aux = torch.stack([balance_loss(m) for m in moe_layers(model)]).mean()
    names, params = zip(*model.named_parameters())
    reached = {n for n, gr in zip(names, torch.autograd.grad(aux, params, allow_unused=True))
               if gr is not None and bool(gr.abs().sum() > 0)}
    last = f"blocks.{cfg.model.depth - 1}."
    assert {"blocks.0.mlp.router.weight", "blocks.0.attn.qkv.weight", "blocks.0.adaLN_modulation.1.weight",
            "blocks.0.mlp.w1", "x_embedder.weight", "y_embedder.table.weight"} <= reached, sorted(reached)
    assert not {n for n in reached if n.startswith(("final_layer", last + "mlp.w", last + "mlp.b"))}, sorted(reached)


@pytest.mark.parametrize("over,degree,world,expect", [
    ({"model.num_experts": 3, "model.top_k": 1}, 2, 2, "model.num_experts=3 is not divisible by --ep-degree 2"),
    ({"model.num_experts": 0}, 2, 2, "model.num_experts=0"),
    ({}, 4, 6, "world size 6 is not divisible by --ep-degree 4"),
])
def test_layout_checks(over, degree, world, expect):
    with pytest.raises(ConfigError, match=expect):
        check_expert_parallel(moe_cfg(**over).model, degree, world)


def test_top_k_larger_than_the_experts_is_one_sentence():
    with pytest.raises(ConfigError, match="model.top_k=5 is larger than model.num_experts=4"):
        moe_cfg(**{"model.top_k": 5})


def test_balance_groups_must_tile_the_micro_batch(micro_cfg):
    from dit_core.train import train
    cfg = micro_cfg(**{"model.num_experts": 4, "model.moe_aux_group": 3, "train.max_steps": 1})
    with pytest.raises(ConfigError, match="model.moe_aux_group=3 images per load-balancing group does not divide "
                                          "a micro-batch of 16 images"):
        train(cfg, quiet=True)


def test_single_process_moe_logs_its_parts(reference):
    log, _ = reference(1, **MOE)
    r = log[0]
    assert r["loss"] == pytest.approx(r["diffusion_loss"] + 0.01 * r["aux_loss"], rel=1e-6)
    tokens = 16 * 16 * 2          # 16 images x 16 tokens x top-2, per layer
    assert len(r["expert_tokens"]) == 2 and all(sum(layer) == tokens for layer in r["expert_tokens"])


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("accum", [1, 2])
def test_expert_parallel_matches_one_process(jobs, reference, name, accum):
    log = jobs(LAYOUTS[name][0])[f"moe {name} a{accum}"]
    ref = reference(accum, **MOE)[0]
    assert_parity(ref, log)                                                             # clipping active
    assert [r["expert_tokens"] for r in log] == [r["expert_tokens"] for r in ref]      # the same routing
    assert max(abs(a["aux_loss"] - b["aux_loss"]) / b["aux_loss"] for a, b in zip(log, ref)) <= 1e-5


def test_expert_parallel_layer_equals_the_whole_layer(jobs):
    (c,) = jobs(4)["expert checks"]
    for P in (2, 4):
        assert c[f"layer P={P}"] <= 1e-6, c                  # output, token / router / expert gradients
        assert c[f"unbalanced P={P}"] <= 1e-6 and c[f"unbalanced P={P} tokens of expert 1"] == 0, c
    assert c["all-to-all bytes == routing counts, every rank"], c   # counted at the collective


def test_checkpoint_resumes_bitwise_and_holds_whole_weights(jobs, tmp_path):
    from dit_core.checkpoint import model_from_checkpoint
    logs = jobs(2)
    full, resumed = logs["moe ckpt"], logs["moe resumed"]
    assert [r["step"] for r in resumed] == list(range(10, STEPS))
    assert_parity(full[10:], resumed, rtol=0.0, steps=STEPS - 10)                   # bitwise, loss and norm
    model, cfg = model_from_checkpoint(D / "ckpt" / f"checkpoint-{STEPS}", ema=False)
    assert cfg.model.num_experts == 4 and moe_layers(model)[0].w1.shape[0] == 4     # every expert, gathered
    assert "--ep-degree 2 on 2 processes, not --ep-degree 1 on 2 processes" in logs["moe resumed by ep 1"]


def test_bad_layouts_through_the_launchers_are_one_sentence(jobs):
    logs = jobs(2)
    assert "model.num_experts=3 is not divisible by --ep-degree 2" in logs["moe E % P"]
    assert "trains with python launchers/single.py or torchrun launchers/moe.py, not with DDPStrategy" in logs["moe on ddp"]
