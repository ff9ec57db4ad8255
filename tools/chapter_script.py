"""Run chapters as plain Python scripts and time them, for machines without Jupyter (the GPU column of
the README's chapter map). Two steps, so the second needs nothing but the project's own dependencies:

    python tools/chapter_script.py write OUT 00_setup.ipynb 03_diffusion.ipynb   # code cells -> OUT/<name>.py
    python tools/chapter_script.py run OUT                                       # run each from notebooks/, timed

Each script holds a chapter's code cells in order (from tools/make_notebooks.py's sources) and runs in one
fresh process started in notebooks/, as Jupyter would, with matplotlib drawing off-screen."""
import os
import subprocess
import sys
import time
from pathlib import Path

NB = Path(__file__).resolve().parents[1] / "notebooks"


def write(out: Path, names) -> None:
    from make_notebooks import NOTEBOOKS
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        cells = [c.source for c in NOTEBOOKS[name] if c.cell_type == "code"]
        (out / name.replace(".ipynb", ".py")).write_text(
            "import matplotlib\nmatplotlib.use('Agg')\n\n" + "\n\n".join(cells) + "\n")


def run(folder: Path) -> int:
    worst = 0
    for f in sorted(folder.resolve().glob("*.py")):
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(NB.parent), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, str(f)], cwd=NB, capture_output=True, text=True, env=env)
        print(f"{f.stem}: {time.perf_counter() - t0:.0f} s, exit {r.returncode}", flush=True)
        (f.parent / f"{f.stem}.out").write_text(r.stdout)
        if r.returncode:
            print(r.stderr[-3000:], flush=True)
        worst = max(worst, r.returncode)
    return worst


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("write", "run"):
        sys.exit(__doc__)
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(run(Path(sys.argv[2])))
