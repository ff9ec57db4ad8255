"""Run chapters as plain Python scripts and time them, for machines without Jupyter (the GPU column of
the README's chapter map):

    python tools/chapter_script.py OUT 00_setup 03_diffusion     # or no names: every chapter

A chapter's source, notebooks/NN_name.py, is a Jupytext percent script: its cells are `# %%` comments,
so Python runs it as it is. Each one runs in a fresh process started in notebooks/, as Jupyter would,
with matplotlib drawing off-screen; its printed output goes to OUT/NN_name.out."""
import os
import subprocess
import sys
import time
from pathlib import Path

NB = Path(__file__).resolve().parents[1] / "notebooks"


def run(out: Path, names) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scripts = [NB / f"{n.removesuffix('.py').removesuffix('.ipynb')}.py" for n in names] or sorted(NB.glob("[0-9]*.py"))
    missing = [str(s) for s in scripts if not s.is_file()]
    if missing:
        sys.exit(f"error: no chapter script {', '.join(missing)}; name chapters as in notebooks/, e.g. 00_setup.")
    worst = 0
    for f in scripts:
        t0 = time.perf_counter()
        env = dict(os.environ, MPLBACKEND="Agg",
                   PYTHONPATH=os.pathsep.join([str(NB.parent), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, str(f)], cwd=NB, capture_output=True, text=True, env=env)
        print(f"{f.stem}: {time.perf_counter() - t0:.0f} s, exit {r.returncode}", flush=True)
        (out / f"{f.stem}.out").write_text(r.stdout)
        if r.returncode:
            print(r.stderr[-3000:], flush=True)
        worst = max(worst, r.returncode)
    return worst


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
