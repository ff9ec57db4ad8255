"""Copy the markdown cells of the chapter sources into already executed notebooks (prose-only edits,
no re-execution):  python tools/sync_markdown.py 03_diffusion.ipynb"""
import sys

import nbformat

from make_notebooks import NB, NOTEBOOKS

for name in sys.argv[1:]:
    nb = nbformat.read(NB / name, 4)
    cells = NOTEBOOKS[name]
    if len(cells) != len(nb.cells) or any(a.cell_type != b.cell_type for a, b in zip(cells, nb.cells)):
        sys.exit(f"{name}: the cells changed shape; rebuild it with tools/make_notebooks.py {name}.")
    for src, cell in zip(cells, nb.cells):
        if cell.cell_type == "markdown":
            cell.source = src.source
    nbformat.write(nb, NB / name)
    print("synced", name)
