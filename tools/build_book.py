"""`make book`: the offline website of the workbook, built from the committed, executed notebooks and the reference
pages (nothing is re-executed), into build/book (open build/book/index.html).

    python tools/build_book.py [--out build/book] [--src build/book_src]

It gathers one Sphinx source folder (--src, rebuilt every time) from docs/book/ (conf.py, the front page, the
memory calculator), the chapters (notebooks/NN_name.ipynb, with their .py beside them for download) and the reference
pages (README.md, docs/*.md, docs/figures), then runs sphinx-build (myst-nb, execution off). On the way it
  * writes _static/calculator_constants.js from dit_core (docs/book/calculator.py: constants(), presets from
    configs/), so the calculator never repeats a number the planner owns;
  * writes _jieba_words.txt, the Chinese terms of docs/glossary.md, so Chinese search keeps them whole;
  * adds, in the copies only, a download line under each chapter's title, a link from each chapter's Exercises to
    its solutions, and a link from each solution back to the exercises.
A missing or unexecuted notebook, a missing page or a failed build stops with one sentence naming it and the fix.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "docs" / "book"
REFERENCE = ["README.md", "docs/results.md", "docs/glossary.md", "docs/solutions.md", "docs/faults.md",
             "docs/multinode.md"]
CHAPTER = re.compile(r"^(\d\d)_\w+$")
PRESETS = ["dit_xl2", "dit_l2", "dit_b2", "dit_s2", "bench", "mnist", "tiny"]   # configs/NAME.yaml, in this order


class BookError(Exception):
    """One sentence: what is wrong with the book's input, and the fix."""


def chapters(root: Path = ROOT) -> list[dict]:
    """Every notebooks/NN_name.py with its executed .ipynb, in order: {"stem", "number", "title", "notebook"}."""
    out = []
    for py in sorted((root / "notebooks").glob("[0-9][0-9]_*.py")):
        m = CHAPTER.match(py.stem)
        if not m:
            continue
        ipynb = py.with_suffix(".ipynb")
        rel = ipynb.relative_to(root)
        if not ipynb.is_file():
            raise BookError(f"{rel} is missing: pair it with its source (`make sync`), execute it (`make notebooks "
                            f"CH={m.group(1)}`) and commit it; the book shows executed notebooks only.")
        try:
            nb = json.loads(ipynb.read_text(encoding="utf-8"))
            cells = nb["cells"]
        except (ValueError, KeyError, TypeError) as e:
            raise BookError(f"{rel} is not a readable notebook ({type(e).__name__}: {e}); restore it from git or "
                            f"re-execute it with `make notebooks CH={m.group(1)}`.") from None
        code = [c for c in cells if c.get("cell_type") == "code"]
        if code and not any(c.get("outputs") for c in code):
            raise BookError(f"{rel} has no outputs: the book shows the committed, executed notebooks; execute it "
                            f"with `make notebooks CH={m.group(1)}` and commit it.")
        title = next((line[2:].strip() for c in cells if c.get("cell_type") == "markdown"
                      for line in _source(c).splitlines() if line.startswith("# ")), py.stem)
        out.append({"stem": py.stem, "number": m.group(1), "title": title, "notebook": nb})
    if not out:
        raise BookError(f"no chapters found in {root / 'notebooks'} (notebooks/NN_name.py with NN_name.ipynb); "
                        f"run `make book` from a checkout of the workbook.")
    return out


def _source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _set_source(cell: dict, text: str) -> None:
    cell["source"] = text


def chapter_copy(ch: dict) -> dict:
    """The notebook as the book shows it: a download line under the title, the Exercises linked to the solutions."""
    nb = json.loads(json.dumps(ch["notebook"]))
    stem, nn = ch["stem"], ch["number"]
    solutions = f"../docs/solutions.md#chapter-{nn}"
    download = (f"Download this chapter: {{download}}`{stem}.ipynb <../_originals/{stem}.ipynb>` (executed) · "
                f"{{download}}`{stem}.py <{stem}.py>` (Jupytext source, `jupytext --sync` pairs them) · "
                f"[solutions to its exercises]({solutions})")
    for cell in nb["cells"]:
        if cell.get("cell_type") == "markdown" and re.search(r"^# ", _source(cell), re.M):
            _set_source(cell, re.sub(r"^(# .*)$", lambda m: m.group(1) + "\n\n" + download, _source(cell),
                                     count=1, flags=re.M))
            break
    for cell in nb["cells"]:
        if cell.get("cell_type") != "markdown":
            continue
        text = _source(cell)
        if not re.search(r"^## Exercises\s*$", text, re.M):
            continue
        head, rest = text.split("## Exercises", 1)
        section, sep, after = rest.partition("\n## ")
        if "](../docs/solutions.md" not in section:      # the link goes at the end of the Exercises section
            section = section.rstrip() + f"\n\nSolutions: [docs/solutions.md, chapter {nn}]({solutions}).\n"
            text = head + "## Exercises" + section + ("\n" + sep.lstrip("\n") + after if sep else "")
        _set_source(cell, text)
        break
    return nb


def solutions_copy(text: str, chs: list[dict]) -> str:
    """docs/solutions.md with a link under each `## Chapter NN` back to that chapter's Exercises."""
    by_number = {c["number"]: c for c in chs}

    def back(m):
        c = by_number.get(m.group(1))
        if not c:
            return m.group(0)
        return (f"{m.group(0)}\n\nThe exercises: [{c['title']}](../notebooks/{c['stem']}.ipynb#exercises).\n")
    return re.sub(r"^## Chapter (\d\d)\s*$", back, text, flags=re.M)


def glossary_words(text: str) -> list[str]:
    """The Chinese terms of the glossary's tables (second column), each run of two or more Han characters."""
    words = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cols) >= 2:
            for w in re.findall(r"[\u4e00-\u9fff]{2,}", cols[1]):
                if w not in words:
                    words.append(w)
    if not words:
        raise BookError("docs/glossary.md has no Chinese terms in its tables' second column; the book's Chinese "
                        "search is fed from there: restore the glossary's tables.")
    return words


def presets(root: Path = ROOT) -> dict:
    """The calculator's presets: the model and training shape of each config in PRESETS that exists."""
    from dit_core.config import load_config
    out = {}
    for name in PRESETS:
        path = root / "configs" / f"{name}.yaml"
        if not path.is_file():
            continue
        cfg = load_config(str(path), {})
        m, t = cfg.model, cfg.train
        if m.num_experts:
            continue                                  # the calculator counts the dense DiT
        out[name] = {"hidden": m.hidden_size, "depth": m.depth, "heads": m.num_heads, "mlp_ratio": m.mlp_ratio,
                     "image_size": m.image_size, "patch": m.patch_size, "in_channels": m.in_channels,
                     "num_classes": m.num_classes, "learn_sigma": m.learn_sigma,
                     "micro_batch": max(1, t.global_batch_size // t.grad_accum),
                     "precision": "fp32" if t.precision == "fp32" else "bf16", "ema": t.ema_decay > 0,
                     "recompute": "full" if t.recompute == "full" else "none",
                     "recompute_blocks": t.recompute_blocks, "dp": 1, "tp": 1, "pp": 1, "cp": 1}
    return out


def calculator_js(root: Path = ROOT) -> str:
    sys.path.insert(0, str(BOOK))
    sys.path.insert(0, str(root))
    import calculator
    p = presets(root)
    data = {"constants": calculator.constants(), "presets": p,
            "default_preset": "dit_xl2" if "dit_xl2" in p else next(iter(p))}
    return ("// Written by tools/build_book.py from dit_core (dit_core/parallel/plan.py, zero_report.py, configs/) at\n"
            "// every `make book`: do not edit. calculator.js reads it.\n"
            f"window.DIT_CALCULATOR = {json.dumps(data, indent=1, sort_keys=True)};\n")


def _fresh(path: Path, what: str) -> None:
    """Remove a previous build at `path` (only something this script made, or an empty folder)."""
    if path.exists():
        ours = (path / ".buildinfo").exists() or (path / "conf.py").exists() or not any(path.iterdir())
        if not ours or path.resolve() in (ROOT, ROOT.parent, Path.home(), Path("/")):
            raise BookError(f"{what} '{path}' exists and is not a book build; give another --{what} or remove it.")
        shutil.rmtree(path)


def stage(src: Path, root: Path = ROOT) -> list[dict]:
    """Gather the Sphinx source folder."""
    chs = chapters(root)
    for rel in REFERENCE:
        if not (root / rel).is_file():
            raise BookError(f"{rel} is missing; the book shows it as a reference page: restore it from git.")
    _fresh(src, "src")
    shutil.copytree(BOOK, src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "calculator.py"))
    (src / "notebooks").mkdir()
    (src / "_originals").mkdir()
    for c in chs:
        shutil.copy2(root / "notebooks" / f"{c['stem']}.ipynb", src / "_originals")
        shutil.copy2(root / "notebooks" / f"{c['stem']}.py", src / "notebooks")
        (src / "notebooks" / f"{c['stem']}.ipynb").write_text(json.dumps(chapter_copy(c), ensure_ascii=False),
                                                              encoding="utf-8")
    (src / "docs").mkdir()
    for rel in REFERENCE:
        text = (root / rel).read_text(encoding="utf-8")
        if rel == "docs/solutions.md":
            text = solutions_copy(text, chs)
        (src / rel).write_text(text, encoding="utf-8")
    if (root / "docs" / "figures").is_dir():
        shutil.copytree(root / "docs" / "figures", src / "docs" / "figures")
    words = glossary_words((root / "docs" / "glossary.md").read_text(encoding="utf-8"))
    (src / "_jieba_words.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
    (src / "_static" / "calculator_constants.js").write_text(calculator_js(root), encoding="utf-8")
    return chs


def build(out: Path, src: Path, root: Path = ROOT, jobs: str = "1") -> tuple[Path, list[str]]:
    """Stage the sources and run sphinx-build into `out`; returns out/index.html and Sphinx's warnings (a missing
    anchor or page, a notebook cell it cannot show), which it also prints."""
    missing = [m for m in ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_copybutton", "jieba")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise BookError(f"the book's tools are not installed ({', '.join(missing)}): run `make venv`, or "
                        f"`pip install -e \".[book]\"` (Python >= 3.11).")
    stage(src, root)
    _fresh(out, "out")
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-j", str(jobs), "-d", str(src / "_doctrees"),
           str(src), str(out)]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    if r.stderr.strip():
        sys.stderr.write(r.stderr)
    index = out / "index.html"
    if r.returncode != 0 or not index.is_file():
        raise BookError(f"sphinx-build failed (exit {r.returncode}, its messages above) on the sources gathered in "
                        f"{src}; fix the page it names, then run `make book` again.")
    return index, [line for line in r.stderr.splitlines() if "WARNING" in line or "ERROR" in line]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/build_book.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "build" / "book"), help="the site (default build/book)")
    p.add_argument("--src", default=str(ROOT / "build" / "book_src"), help="the gathered Sphinx sources")
    p.add_argument("--jobs", default="1", help="sphinx-build -j (default 1; 'auto' for every core)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        index, warnings = build(Path(a.out), Path(a.src), jobs=a.jobs)
    except BookError as e:
        print(f"make book: {e}", file=sys.stderr)
        return 1
    print(f"book built in {time.perf_counter() - t0:.0f} s"
          + (f" with {len(warnings)} warnings (above)" if warnings else "") + f": open {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
