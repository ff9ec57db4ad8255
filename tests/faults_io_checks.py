"""Rows of the suite's 2-process job for tests/test_faults_io.py that prepare what the next rows read, between two
runs (a launcher row cannot): rank 0 works, every rank waits at a barrier.

    prepare D     copies of D/fsdp and D/zero (written by the rows before) with faults a legacy checkpoint can hold
                  (no manifest.json; a .distcp shard or a DeepSpeed partition cut short, missing, or with its last
                  bytes zeroed), and two mounts: D/full, a tmpfs with room for one FSDP checkpoint but not two, and
                  D/ro, read-only (without root: a folder without write permission)
    finish D      copies what D/full holds to D/full-after, then unmounts D/full and D/ro

Rank 0 writes what it did (or why it could not: no permission to mount) as one JSON line to --log-jsonl OUT."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist


def out_path(argv: list) -> str:
    return argv[argv.index("--log-jsonl") + 1]


def mount(where: Path, options: str) -> str | None:
    """Mount a tmpfs at `where`; None, or why not (not root, no mount command, a container without the right)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                           text=True, timeout=30)
    except OSError as e:
        return f"mount: {e.strerror}"
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited with {r.returncode}")


def umount(where: Path) -> int:
    """Unmount `where` if something is mounted there (the test's teardown calls it again: no harm)."""
    if not os.path.ismount(where):
        return 0
    return subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode


def legacy(src: Path, dst: Path) -> Path:
    """A copy of the run folder `src` whose checkpoints have no manifest (written before manifests existed)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "log.jsonl"))
    for m in dst.glob("checkpoint-*/manifest.json"):
        m.unlink()
    return dst


def cut(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def zero_tail(f: Path, n: int = 300) -> None:
    b = bytearray(f.read_bytes())
    b[-n:] = bytes(n)
    f.write_bytes(bytes(b))


def prepare(d: Path) -> dict:
    out = {}
    ck = "checkpoint-2"
    cut(legacy(d / "fsdp", d / "fsdp-cut") / ck / "dcp" / "__1_0.distcp")
    (legacy(d / "fsdp", d / "fsdp-missing") / ck / "dcp" / "__0_0.distcp").unlink()
    zero_tail(legacy(d / "fsdp", d / "fsdp-damaged") / ck / "dcp" / "__1_0.distcp")
    z = legacy(d / "zero", d / "zero-cut") / ck / "ds"
    out["zero_cut"] = str(sorted(z.glob("*optim_states.pt"))[-1])
    cut(Path(out["zero_cut"]))
    # room for the first FSDP checkpoint (and the log), not for the second
    one = sum(f.stat().st_size for f in (d / "fsdp" / "checkpoint-1").rglob("*") if f.is_file())
    out["full_size"] = -(-int(one * 1.5) // 4096) * 4096
    out["full"] = mount(d / "full", f"size={out['full_size']}")
    out["ro"], out["ro_says"] = mount(d / "ro", "ro,size=64k"), "Read-only file system"
    if out["ro"] and os.geteuid() != 0:          # without root, permission bits make a read-only folder too
        (d / "ro").chmod(0o555)
        out["ro"], out["ro_says"] = None, "Permission denied"
    return out


def finish(d: Path) -> dict:
    out = {}
    if (d / "full").is_dir():
        shutil.copytree(d / "full", d / "full-after", ignore=shutil.ignore_patterns(".lock"))
        out["full_held"] = sorted(p.name for p in (d / "full").iterdir())
    for m in ("full", "ro"):
        out[f"umount_{m}"] = umount(d / m)
    if (d / "ro").is_dir():
        (d / "ro").chmod(0o755)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    action, d = argv[0], Path(argv[1])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out = {"prepare": prepare, "finish": finish}[action](d)
        Path(out_path(argv)).write_text(json.dumps(out) + "\n")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
