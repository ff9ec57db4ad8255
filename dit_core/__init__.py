"""dit_core: the DiT, its data and objective, the one training loop, and the strategies that plug into it.

The floor map. Imports run one way: a module uses modules on its own floor or below, never above, and no set of
modules imports itself round in a circle (imports inside functions count too). `tests/test_layers.py` reads the
table below and fails naming the import that breaks it; a new module gets a line here before it is imported.

    floor  modules: what lives there
    0  errors, process: the error classes (and first_error); leaving a process (one line, exit codes, the
           collective timeout, stuck siblings stopped)
    1  config, logs, scratch: the config dataclasses and their rules; JSONL logs and the parity verdict;
           temporary folders and the one atomic file write
    2  data, folder, latents, sources, batch, fast: MNIST (and whether data fit the model); an image folder
           decoded once; its VAE latents encoded once; the source data.source names (Fashion-MNIST too); the global
           batch of the determinism contract; batches drawn on the GPU
    3  moe, model, fp8, diffusion, objective: the mixture-of-experts layer; the DiT; float8 linear layers; the
           noise schedule and its errors, sampling; the loss of one micro-batch every strategy trains (with the
           MoE balance term)
    4  checkpoint, checkpoint_dcp: the checkpoint folder (manifest, readers, writers, the resume preflight) and
           its sharded DCP format
    5  rundir, cli, guard: one run per results folder; the launcher's command line and --resume auto; the
           divergence guard
    6  engine: the plain-PyTorch engine (backward, clipping, AdamW, schedule, EMA, files) and what engines share
    7  strategy: the seam: what a strategy provides and what the loop calls on it (Strategy, Engine,
           TrainHooks), on one page
    8  train, parallel: the loop; every strategy (parallel/*), which plugs into the loop only through the seam
    9  bench, bench_model, convert, evaluate, export, memory, many, multinode, parity, plots: lab tools that
           measure, convert (Meta's DiT checkpoints), score, export, compare
    (launchers/, tools/ and tests/ stand above every floor; nothing here imports them)

Where to start: `strategy.py` (the seam, one page), `train.py` (the loop), then one strategy, e.g.
`parallel/ddp.py`. How FSDP plugs in: `strategy.py`, `train.py`, `parallel/fsdp_train.py` (its strategy and
engine), `parallel/fsdp.py` (the sharding itself).
"""
