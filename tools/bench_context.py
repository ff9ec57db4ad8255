"""Context parallelism counted (docs/results.md, "Context parallelism"): elements sent per layer and activation memory,
at more than one degree P. Everything here is counted (elements, bytes), nothing is timed.

    torchrun --nproc_per_node 4 tools/bench_context.py --out context.json          # CPU (gloo) or GPUs (NCCL)

Each degree P of --degrees (each must divide the world size; by default every one of 2, 4, 8 that divides the world
size and the head count) runs on groups of P consecutive ranks. For each sequence length (image size / patch
size), on rank 0 of the first group:
1. the elements ring attention sends in one layer's forward and backward (counted in dit_core.parallel.context),
   beside the formula (forward: the K/V blocks, 2·b·N/P·h each, P-1 times; backward: those P-1 again, plus the
   partial dK/dV passed P times), and the elements Ulysses' all-to-alls send (counted here, at the collective: of
   each all-to-all's input, the (P-1)/P that leaves the rank), beside its formula (ulysses_elements);
2. activation memory: the bytes of the storages autograd saves in one forward of the whole DiT (weights excluded),
   for one process holding every token, for Ulysses and for the ring (each rank: its N/P tokens);
3. from the last two lengths, a line per layout: the longest sequence whose activations fit a budget per rank.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.config import load_config  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.parallel import context  # noqa: E402
from dit_core.parallel.dist import exit_process, init_from_env, teardown  # noqa: E402
from dit_core.parallel.ulysses import SequenceParallelDiT, UlyssesAttention, ulysses_elements  # noqa: E402

# Elements this process's all-to-alls sent to other ranks (Ulysses has no counter of its own; counted at the call)
A2A = {"elements": 0}
_all_to_all_single = dist.all_to_all_single


def _counting_all_to_all_single(output, input, *args, group=None, **kw):
    P = dist.get_world_size(group)
    A2A["elements"] += input.numel() * (P - 1) // P         # equal splits: chunk j goes to rank j, one stays
    return _all_to_all_single(output, input, *args, group=group, **kw)


def saved_bytes(fn) -> int:
    seen, weights = {}, set()

    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(weights)
    return sum(seen.values()), out


def measure(a, P, group, dev) -> dict:
    rows = []
    for pair in a.sizes.split(","):
        size, patch = map(int, pair.split(":"))
        cfg = load_config(None, {"model.image_size": size, "model.patch_size": patch, "model.hidden_size": a.hidden,
                                 "model.depth": a.depth, "model.num_heads": a.heads})
        N = (size // patch) ** 2
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.batch, 1, size, size, generator=g).to(dev)
        t, y = torch.randint(0, 1000, (a.batch,), generator=g).to(dev), torch.randint(0, 10, (a.batch,), generator=g).to(dev)
        row = {"degree": P, "image_size": size, "patch": patch, "tokens": N}

        def run(model, weights_of):
            def fn(weights):
                weights |= {p_.untyped_storage().data_ptr() for p_ in weights_of.parameters()}
                return model(x, t, y)
            return fn
        torch.manual_seed(0)
        one = DiT(cfg.model).to(dev)
        row["single_bytes"], _ = saved_bytes(run(one, one))
        for name, attn in (("ulysses", UlyssesAttention(group)), ("ring", context.ContextAttention(None, group))):
            torch.manual_seed(0)
            m = DiT(cfg.model).to(dev)
            sp = SequenceParallelDiT(m, group, attn)
            counter = context.SENT if name == "ring" else A2A
            counter["elements"] = 0
            row[f"{name}_bytes"], out = saved_bytes(run(sp, m))
            fwd = counter["elements"]
            out.float().square().mean().backward()
            row[f"{name}_fwd_elements_per_layer"] = fwd / a.depth
            row[f"{name}_bwd_elements_per_layer"] = (counter["elements"] - fwd) / a.depth
        blk = a.batch * N // P * a.hidden          # one rank's K (or V) block
        row["ring_fwd_formula"] = 2 * blk * (P - 1)
        row["ring_bwd_formula"] = 2 * blk * (P - 1) + 2 * blk * P
        row["ulysses_fwd_formula"] = ulysses_elements(a.batch, N, a.hidden, P)
        rows.append(row)
    # the longest sequence whose activations fit the budget, on the line through the last two lengths
    (r0, r1), fits = rows[-2:], {}
    for name in ("single", "ulysses", "ring"):
        slope = (r1[f"{name}_bytes"] - r0[f"{name}_bytes"]) / (r1["tokens"] - r0["tokens"])
        fits[name] = int(r1["tokens"] + (a.budget_gib * 2**30 - r1[f"{name}_bytes"]) / slope)
    return {"rows": rows, "longest_tokens_in_budget": fits}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="28:7,28:2,56:2,56:1", help="image_size:patch_size pairs")
    p.add_argument("--degrees", help="the degrees P measured, comma-separated, each a divisor of the world size "
                                     "(default: each of 2, 4, 8 that divides the world size and --heads)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--out")
    a = p.parse_args()
    env = init_from_env("auto")
    dev, W, r = env.device, env.world_size, env.rank
    degrees = [int(d) for d in a.degrees.split(",")] if a.degrees else \
        [d for d in (2, 4, 8) if W % d == 0 and a.heads % d == 0]
    bad = [d for d in degrees if d < 2 or W % d or a.heads % d]
    if bad or not degrees:
        raise SystemExit(f"--degrees {a.degrees or '(default)'}: {bad or 'none'} of them a divisor >= 2 of the world "
                         f"size {W} and of --heads {a.heads}; start torchrun --nproc_per_node 4 (P = 2 and 4) or "
                         f"choose other degrees.")
    dist.all_to_all_single = _counting_all_to_all_single
    by_degree = {}
    for P in degrees:
        mine = None
        for base in range(0, W, P):                  # every rank builds every group, in the same order
            grp = dist.new_group(list(range(base, base + P))) if P < W else None
            if base <= r < base + P:
                mine = grp
        by_degree[str(P)] = measure(a, P, mine, dev)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "world": W, "args": vars(a),
           "degrees": by_degree}
    if r == 0:
        print(json.dumps(res, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))
    teardown()
    exit_process(0)


if __name__ == "__main__":
    main()
