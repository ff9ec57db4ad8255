"""Process setup: one place that turns torchrun's environment into a process group.

NCCL when this rank has a GPU, gloo on the CPU; one device per local rank. The
returned `DistEnv` is passed explicitly to whatever needs it (no global state).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..batch import check_batch_split  # noqa: F401  (the launchers' name for it)
from ..strategy import Strategy
from ..errors import ConfigError, LaunchError, user_errors
from ..process import TIMEOUT, exit_process, stop_local_peers, watch_launcher  # noqa: F401

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    group: object = None      # the data-parallel group (None = the default group, all ranks)
    timeout: float = 300.0    # seconds a collective waits for the other ranks (run.dist_timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "auto", launcher: str = "torchrun --nproc_per_node N",
                  timeout: float = 300.0) -> DistEnv:
    """Join the process group torchrun (or deepspeed, accelerate) describes in the environment.

    `timeout` (run.dist_timeout) bounds every collective: a rank that stops answering ends the job
    within it instead of leaving the others waiting forever. A rank whose launcher dies stops too."""
    missing = [k for k in REQUIRED_ENV if k not in os.environ]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: this script must be started by a distributed launcher, "
                          f"e.g. `{launcher} <script>`, not plain python.")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("run.device='cuda' but no CUDA GPU is visible; use --device cpu or --device auto.")
        gpus = torch.cuda.device_count()
        # every rank of the machine sees the same counts, so every one stops with the same sentence (rank 0 would
        # otherwise wait in the rendezvous for a rank that already left)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if max(local + 1, local_world) > gpus:
            n = max(local + 1, local_world)
            raise LaunchError(f"{n} processes on this machine but it has {gpus} GPU{'s' if gpus != 1 else ''} "
                              f"(one per process); start at most {gpus} (--nproc_per_node {gpus}), or add --device "
                              f"cpu to run {n} processes over gloo on the CPU.")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
        # Processes of one node share its cores: one thread each unless told otherwise.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    TIMEOUT["seconds"] = timeout          # before the rendezvous: a rank that never joins is told in one sentence too
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": dev} if backend == "nccl" else {}), **_restart_store(rank, world, timeout))
    watch_launcher()
    return DistEnv(rank, world, local, dev, backend, timeout=timeout)


def _restart_store(rank: int, world: int, timeout: float) -> dict:
    """After a torchrun restart (--max-restarts): the group's store under a prefix of its own attempt.

    Without it the restarted ranks met in the store the keys of the attempt that failed: gloo read a dead rank's
    address from it and failed with "Connection refused" (3 of 5 restarts on the 2-core CPU), or waited. With a
    prefix per attempt every key is the new attempt's."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or "MASTER_ADDR" not in os.environ:
        return {}
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=datetime.timedelta(seconds=timeout))
    return {"store": dist.PrefixStore(f"dit-attempt-{attempt}", store)}


class DistStrategy(Strategy):
    """Members every multi-process strategy shares: counts summed over all ranks, rank 0's verdict
    shared, a barrier of all ranks."""

    trains_moe = False      # only expert parallelism (parallel/expert.py) knows where each expert lives
    one_process = False

    def __init__(self, env: DistEnv):
        self.env = env
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float().clone()
        dist.all_reduce(t)
        return t

    def agree(self, error: Exception | None) -> None:
        kinds = {k.__name__: k for k in user_errors()}
        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            name, msg = box[0]
            raise kinds.get(name, ConfigError)(msg)

    def barrier(self) -> None:
        dist.barrier()


def teardown() -> None:
    """Call after a successful run: wait for every rank (rank 0 may still be writing its
    checkpoint), then close the group. Not called on an error path, where a barrier would hang."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish() -> None:
    """The end of a launched run: every rank done, the group closed, the process gone (exit_process)."""
    teardown()
    exit_process(0)


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous on this machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- 2-D layouts (DP x SP, DP x TP)

@dataclass
class Mesh:
    """Ranks laid out as a (dp, inner) grid: rank = dp_rank * inner + inner_rank.

    The inner dimension (sequence or tensor parallel) takes *consecutive* ranks, so with one
    process per GPU its group sits inside one node, on the fastest links: Ulysses and tensor
    parallelism communicate inside every layer, data parallelism once per step.
    """
    dp_size: int
    inner_size: int
    dp_rank: int
    inner_rank: int
    dp_group: object
    inner_group: object


def build_mesh(env: DistEnv, inner: int, flag: str) -> Mesh:
    """Every rank builds every group, in the same order (new_group is a collective call).

    Each group gets run.dist_timeout explicitly: `new_group` without a timeout takes torch's default (30
    minutes), not the one the world group was started with, so a stopped peer in a pipeline's receive or a
    tensor-parallel all-reduce would hold the job for half an hour."""
    check_degree(env.world_size, inner, flag)
    dp = env.world_size // inner
    timeout = datetime.timedelta(seconds=env.timeout)
    mine = {}
    for d in range(dp):                               # inner groups: [d*inner, ..., d*inner + inner - 1]
        ranks = [d * inner + i for i in range(inner)]
        g = dist.new_group(ranks, timeout=timeout)
        if env.rank in ranks:
            mine["inner"] = g
    for i in range(inner):                            # data-parallel groups: same inner rank, every dp rank
        ranks = [d * inner + i for d in range(dp)]
        g = dist.new_group(ranks, timeout=timeout)
        if env.rank in ranks:
            mine["dp"] = g
    return Mesh(dp, inner, env.rank // inner, env.rank % inner, mine["dp"], mine["inner"])


def check_degree(world_size: int, degree: int, flag: str) -> None:
    if degree < 1:
        raise ConfigError(f"{flag} {degree} must be at least 1.")
    if world_size % degree:
        raise ConfigError(f"world size {world_size} is not divisible by {flag} {degree}; start a multiple of "
                          f"{degree} processes (or lower {flag}).")
