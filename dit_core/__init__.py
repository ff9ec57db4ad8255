"""dit_core: the DiT, its data and objective, the one training loop, and the strategies that plug into it.

The floor map. Imports run one way: a module uses modules on its own floor or below, never above, and no set of
modules imports itself round in a circle (imports inside functions count too). `tests/test_layers.py` reads the
table below and fails naming the import that breaks it; a new module gets a line here before it is imported.

    floor  modules: what lives there
    0  errors, process: the error classes; leaving a process (one line, exit codes, the collective timeout,
           stuck siblings stopped)
    1  config, logs, scratch: the config dataclasses and their rules; JSONL logs; temporary folders
    2  data, batch, fast: MNIST; the global batch of the determinism contract; batches drawn on the GPU
    3  model, diffusion: the DiT; the noise schedule, the loss of a micro-batch, sampling
    4  checkpoint, checkpoint_dcp: the checkpoint folder (manifest, readers, writers) and its sharded DCP format
    5  rundir, cli: one run per results folder; the launcher's command line and --resume auto
    6  engine: the seam: `Parallel` (what a strategy provides), `TrainHooks`, the plain-PyTorch engine
    7  train, parallel: the loop; every strategy (parallel/*), which plugs into the loop only through the seam
    8  bench, evaluate, export, memory, many, multinode, parity, plots: lab tools that measure, score, export, compare
    (launchers/, tools/ and tests/ stand above every floor; nothing here imports them)

Where to start: `engine.py` (the seam, one page), `train.py` (the loop), then one strategy, e.g.
`parallel/ddp.py`; `../shared/DESIGN.md` states the contracts they keep.
"""
