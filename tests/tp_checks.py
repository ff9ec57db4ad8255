"""Checks of tensor parallelism that need real processes; run by test_tp.py as
    torchrun --standalone --nproc_per_node 2 tests/tp_checks.py OUT.json
Every rank builds the same full layer (same seed), keeps its slice, and compares with the full layer
computed locally. Rank 0 writes {check: value} to OUT.json."""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.config import load_config  # noqa: E402
from dit_core.model import Attention, DiT, Mlp  # noqa: E402
from dit_core.parallel.dist import exit_process, init_from_env, teardown  # noqa: E402
from dit_core.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, block_slice,  # noqa: E402
                                      gather_state_dict, head_rows, parallelize, tp_allreduce_elements)
from dit_core.parallel.measure import CommCounter  # noqa: E402

G = dist.group.WORLD


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def worst_over_ranks(x: float) -> float:
    t = torch.tensor(x)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def compare_layer(full, tp, pairs, x_shape=(3, 5, 32)):
    """Output, input gradient and the named weight gradients (full gradient sliced like the weight)."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(x_shape, generator=g), torch.randn(x_shape, generator=g)
    xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_t = full(xf), tp(xt)
    (out_f * w).sum().backward()
    (out_t * w).sum().backward()
    res = {"out": rel(out_t, out_f), "grad_x": rel(xt.grad, xf.grad)}
    for name, get_full, get_tp in pairs:
        res[name] = rel(get_tp(tp), get_full(full))
    return worst_over_ranks(max(res.values()))


def main():
    env = init_from_env("cpu")
    r, P = env.rank, env.world_size
    out = {}
    # f and g alone
    from dit_core.parallel.tensor import CopyToTensorParallel, ReduceFromTensorParallel
    x = torch.full((2,), float(r + 1), requires_grad=True)
    y = CopyToTensorParallel.apply(x, G)
    (y * (r + 1)).sum().backward()
    out["f_forward_is_identity"] = torch.equal(y.detach(), x.detach())
    out["f_backward_sums"] = x.grad.tolist() == [float(sum(range(1, P + 1)))] * 2
    x = torch.full((2,), float(r + 1), requires_grad=True)
    y = ReduceFromTensorParallel.apply(x, G)
    y.sum().backward()
    out["g_forward_sums"] = y.tolist() == [float(sum(range(1, P + 1)))] * 2
    out["g_backward_is_identity"] = x.grad.tolist() == [1.0, 1.0]

    # one MLP: column then row
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    tp = copy.deepcopy(mlp)
    cols = block_slice(128, r, P)
    tp.fc1 = ColumnParallelLinear(mlp.fc1, cols, G)
    tp.fc2 = RowParallelLinear(mlp.fc2, cols, G)
    out["mlp_worst"] = compare_layer(mlp, tp, [
        ("fc1_weight", lambda m: m.fc1.weight.grad[cols], lambda m: m.fc1.weight.grad),
        ("fc1_bias", lambda m: m.fc1.bias.grad[cols], lambda m: m.fc1.bias.grad),
        ("fc2_weight", lambda m: m.fc2.weight.grad[:, cols], lambda m: m.fc2.weight.grad),
        ("fc2_bias", lambda m: m.fc2.bias.grad, lambda m: m.fc2.bias.grad)])
    # one attention: whole heads per rank
    torch.manual_seed(0)
    att = Attention(32, 4)
    tpa = copy.deepcopy(att)
    rows, hcols = head_rows(4, 8, r, P), block_slice(32, r, P)
    tpa.qkv = ColumnParallelLinear(att.qkv, rows, G)
    tpa.proj = RowParallelLinear(att.proj, hcols, G)
    out["attention_worst"] = compare_layer(att, tpa, [
        ("qkv_weight", lambda m: m.qkv.weight.grad[rows], lambda m: m.qkv.weight.grad),
        ("proj_weight", lambda m: m.proj.weight.grad[:, hcols], lambda m: m.proj.weight.grad),
        ("proj_bias", lambda m: m.proj.bias.grad, lambda m: m.proj.bias.grad)])

    # the whole DiT: slices gather back to the single-process weights; memory; bytes
    cfg = load_config(None, {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 4, "model.patch_size": 7})
    torch.manual_seed(0)
    dit = DiT(cfg.model)
    full_sd = {k: v.clone() for k, v in dit.state_dict().items()}
    block_full = sum(p.numel() for b in dit.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)
                     for p in (m.weight,))
    counts = {"blocks": lambda: sum(p.numel() for p in dit.blocks.parameters()),
              "modulation": lambda: sum(p.numel() for b in dit.blocks for p in b.adaLN_modulation.parameters()),
              "model": lambda: sum(p.numel() for p in dit.parameters())}
    full = {k: f() for k, f in counts.items()}
    parallelize(dit, G)
    block_mine = sum(m.weight.numel() for b in dit.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
    out["block_weight_share"] = block_mine / block_full
    mine = {k: f() for k, f in counts.items()}          # what this rank holds after parallelize, counted
    out["params_full"], out["params_mine"] = full, mine
    gathered = gather_state_dict(dit, G)
    out["gathered_equals_single"] = list(gathered) == list(full_sd) and all(
        torch.equal(gathered[k], full_sd[k]) for k in full_sd)
    B = 4
    x, t, y = torch.randn(B, 1, 28, 28), torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    with CommCounter() as c:
        dit(x, t, y).square().mean().backward()
    out["all_reduce_calls"] = c.calls["all_reduce"]
    out["all_reduce_bytes"] = c.bytes["all_reduce"]
    out["formula_bytes"] = cfg.model.depth * tp_allreduce_elements(B, dit.num_tokens, 32) * 4
    if r == 0:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    teardown()
    exit_process(0)


if __name__ == "__main__":
    main()
