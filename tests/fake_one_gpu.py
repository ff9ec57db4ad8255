"""Run a launcher as if this machine had one CUDA GPU (for the one-GPU launch check on a CPU-only machine):
    torchrun --nproc_per_node 2 tests/fake_one_gpu.py launchers/ddp.py --device auto ...
Only the two questions a launcher asks before it touches a GPU are answered: is there one, and how many."""
import runpy
import sys

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
