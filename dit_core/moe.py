"""The mixture of experts (混合专家, MoE) that a DiT block may hold in place of its MLP: the layer, how its tokens
reach the experts in one process, and the load-balancing loss computed from its routing. Expert parallelism
(`parallel/expert.py`) swaps in a dispatch that sends every token to the rank of its expert; the objective
(`objective.py`) adds the balance loss to the diffusion loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoEMlp(nn.Module):
    """Mixture of experts in place of the MLP (Shazeer et al. 2017; Switch, Fedus et al. 2021; DiT-MoE, Fei et al.
    2024): a linear router scores the E experts for every token, the token goes to its top-k (weights: their
    router probabilities, renormalised to sum to 1), and its output is the weighted sum of those experts' MLPs.

    The E expert MLPs are stacked in four parameters (w1: E x hidden x mlp_hidden, ...): expert parallelism keeps
    a slice of dim 0 on each rank under the same names. `dispatch(moe, x, top_i, w)` runs the experts on the
    tokens; expert parallelism swaps in one that sends every token to the rank of its expert and back.

    After each forward `stats` holds, per routing group of `group` images: tokens per expert (counts) and the
    summed router probability per expert: the load-balancing loss is computed from them (`balance_loss`)."""

    def __init__(self, hidden: int, mlp_hidden: int, num_experts: int, top_k: int, group: int):
        super().__init__()
        self.num_experts, self.top_k, self.group = num_experts, top_k, group
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, mlp_hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, mlp_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, mlp_hidden, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.act = nn.GELU(approximate="tanh")
        self.dispatch = dispatch_local
        self.stats = None

    def reset_experts(self) -> None:
        """Each expert initialised as the dense Mlp's Linear layers are (Xavier uniform, zero bias)."""
        for w in (self.w1, self.w2):
            for e in range(w.shape[0]):
                nn.init.xavier_uniform_(w.data[e])         # the bound depends on fan_in + fan_out only
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows grouped by expert, counts[j] of them for this module's j-th expert: each group through its MLP."""
        outs = [self.act(seg @ self.w1[j] + self.b1[j]) @ self.w2[j] + self.b2[j]
                for j, seg in enumerate(rows.split(counts)) if counts[j]]
        if not outs:       # no rows for these experts: an empty result still tied to `rows` in the graph, so
            # that expert parallelism's backward all-to-all runs on this rank too (its peers wait for it)
            return rows @ rows.new_zeros(rows.shape[-1], self.w2.shape[-1])
        return torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, h = x.shape
        flat = x.reshape(B * S, h)
        probs = torch.softmax(self.router(flat).float(), dim=-1)            # (T, E), in fp32 under autocast too
        top_p, top_i = probs.topk(self.top_k, dim=-1)                        # (T, k)
        w = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        if self.group and B % self.group == 0:
            G, E = B // self.group, self.num_experts
            one_hot = F.one_hot(top_i, E).sum(1).view(G, -1, E)              # (G, tokens per group, E)
            self.stats = (one_hot.sum(1), probs.view(G, -1, E).sum(1))       # counts, summed probabilities
        else:
            self.stats = None        # a batch the groups do not tile (sampling, CFG doubling): no balance loss
        return self.dispatch(self, flat, top_i, w).view(B, S, h)


def dispatch_local(moe: MoEMlp, x: torch.Tensor, top_i: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """All experts in this process: the (token, choice) pairs sorted by expert, each expert's rows through its
    MLP, the results put back in pair order and combined with the weights."""
    T, k = top_i.shape
    order = top_i.flatten().argsort(stable=True)                  # pairs grouped by expert
    counts = torch.bincount(top_i.flatten(), minlength=moe.num_experts).tolist()
    out = moe.experts(x[order // k], counts)
    return combine(out, order, w)


def combine(out: torch.Tensor, order: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`out`: the expert outputs of the (token, choice) pairs in `order`; the weighted sum over each token's k."""
    T, k = w.shape
    y = out[torch.argsort(order)]                                  # back to pair order: token t's k rows together
    return (y.view(T, k, -1) * w.unsqueeze(-1)).sum(1)


def balance_loss(moe: MoEMlp) -> torch.Tensor:
    """The load-balancing loss of the last forward (Switch: E * sum_e f_e P_e, with f_e the share of the
    (token, choice) pairs expert e received and P_e its mean router probability), averaged over the routing
    groups. 1 when the routing is uniform; it grows as the router favours experts. f has no gradient: the
    router learns through P."""
    counts, prob_sum = moe.stats
    pairs = counts.sum(-1, keepdim=True).float()                   # tokens per group x top_k
    tokens = pairs / moe.top_k
    f = counts.float() / pairs
    return (moe.num_experts * (f * prob_sum / tokens).sum(-1)).mean()


def moe_layers(model: nn.Module) -> list[MoEMlp]:
    """Every mixture-of-experts layer of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEMlp)]
