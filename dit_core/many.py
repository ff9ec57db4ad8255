"""Several runs of one launcher in one set of processes (see `dit_core.parity.run_launchers`).

    torchrun --nproc_per_node 2 -m dit_core.many runs.json

`runs.json` holds a list of {"script": launcher path, "args": [...]}; run i is `<script> <args>`, through that
launcher's own main(argv). Every rank runs the same list in the same order; a barrier separates two runs. A run that
stops with a user error (a bad value: the same sentence on every rank) is recorded in `runs.json.errors`
and the next run goes on, so a table of bad inputs costs one start-up too.
"""
import gc
import importlib.util
import json
import sys
from pathlib import Path
from .errors import user_errors


def load(script: str, cache: dict):
    if script not in cache:
        spec = importlib.util.spec_from_file_location(f"launcher_{Path(script).stem}", script)
        cache[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cache[script])
    return cache[script]


def main(argv=None) -> None:
    (runs_file,) = argv if argv else sys.argv[1:]
    import torch.distributed as dist

    errors, launchers = {}, {}
    for i, run in enumerate(json.loads(Path(runs_file).read_text())):
        try:
            load(run["script"], launchers).main(run["args"])
        except user_errors() as e:
            errors[i] = str(e)
        gc.collect()                     # the last run's engine and buffers, before the next one
        if dist.is_initialized():
            dist.barrier()
    if errors and (not dist.is_initialized() or dist.get_rank() == 0):
        Path(f"{runs_file}.errors").write_text(json.dumps(errors))


if __name__ == "__main__":
    from .process import run_main
    from .parallel.dist import finish

    run_main(lambda argv: main(sys.argv[1:]))
    import torch.distributed as dist
    if dist.is_initialized():
        finish()
