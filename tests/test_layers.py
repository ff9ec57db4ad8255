"""The floor map in dit_core/__init__.py holds: every module of dit_core is on it, imports go down (or across one
floor), no import cycle (imports inside functions count), and the checker catches a package that breaks each rule."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floor_map(package: Path) -> dict[str, int]:
    """{module: floor} from the table in the package's docstring, lines `    <floor>  <module>, <module>: <what>`
    (a module listed as `parallel` covers `parallel.*`)."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()), clean=False) or ""
    floors = {}
    for m in re.finditer(r"^ {4}(\d+) +([a-z_][a-z0-9_, ]*):", doc, re.M):
        for name in m.group(2).replace(",", " ").split():
            floors[name] = int(m.group(1))
    return floors


def imports(package: Path) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of one module of `package` by another, inside functions too."""
    name = package.name
    modules = {}
    for p in sorted(package.rglob("*.py")):
        parts = p.relative_to(package.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[mod] = p
    out = []
    for mod, p in modules.items():
        pkg = mod if p.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c in modules and c != mod and c != name:
                    out.append((mod, c, node.lineno))
                    break
    return out


def short(mod: str, package: str) -> str:
    return mod[len(package) + 1:] if mod.startswith(package + ".") else mod


def problems(package: Path) -> list[str]:
    """Every way `package` breaks its floor map, one sentence each."""
    name = package.name
    floors = floor_map(package)
    edges = imports(package)
    mods = {m for e in edges for m in e[:2]} | {
        ".".join(p.relative_to(package.parent).with_suffix("").parts) for p in package.glob("*.py")
        if p.name != "__init__.py"} | {f"{name}.{p.name}" for p in package.iterdir() if p.is_dir()
                                       and (p / "__init__.py").exists()}

    def floor(mod):
        s = short(mod, name)
        return floors.get(s, floors.get(s.split(".")[0]))

    out = [f"{name}/{short(m, name).replace('.', '/')} is not on the floor map in {name}/__init__.py: give it a "
           f"floor there" for m in sorted(mods) if m != name and floor(m) is None]
    for a, b, line in edges:
        fa, fb = floor(a), floor(b)
        if fa is not None and fb is not None and fb > fa:
            out.append(f"{name}/{short(a, name).replace('.', '/')}.py:{line} imports {short(b, name)} (floor {fb}) "
                       f"from floor {fa}: move what it needs down, or the importer up")
    # cycles: Tarjan's strongly connected components over the import graph
    graph = {}
    for a, b, line in edges:
        graph.setdefault(a, []).append((b, line))
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    for comp in comps:
        inside = [f"{short(a, name)}:{line} -> {short(b, name)}" for a, b, line in edges if a in comp and b in comp]
        out.append(f"import cycle among {', '.join(short(m, name) for m in comp)} ({'; '.join(inside)}): break it")
    return out


def test_dit_core_keeps_its_floor_map():
    found = problems(ROOT / "dit_core")
    assert not found, "\n".join(found)
    floors = floor_map(ROOT / "dit_core")
    assert floors["errors"] == 0 and floors["engine"] < floors["train"] == floors["parallel"] < floors["parity"]


def test_the_loop_does_not_import_a_strategy():
    assert not [b for a, b, _ in imports(ROOT / "dit_core") if a == "dit_core.train"
                and b.startswith("dit_core.parallel")]


def test_the_checker_catches_an_upward_import_a_cycle_and_an_unmapped_module(tmp_path):
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Toy.\n\n    0  low: the bottom\n    1  mid: the middle\n    2  top: the top\n"""\n')
    (pkg / "low.py").write_text("def f():\n    from .top import g  # upward, inside a function\n")
    (pkg / "mid.py").write_text("from . import low\n")
    (pkg / "top.py").write_text("from .mid import x\nfrom .stray import y\n\n\ndef g():\n    pass\n")
    (pkg / "stray.py").write_text("")
    found = problems(pkg)
    assert any(s.startswith("toy/low.py:2 imports top (floor 2) from floor 0") for s in found), found
    assert any(s.startswith("import cycle among low, mid, top") for s in found), found
    assert any(s.startswith("toy/stray is not on the floor map") for s in found), found
    (pkg / "low.py").write_text("X = 1\n")                    # the upward import gone: the cycle goes with it
    (pkg / "__init__.py").write_text('"""Toy.\n\n    0  low, stray: the bottom\n    1  mid: x\n    2  top: y\n"""\n')
    assert problems(pkg) == []


def test_no_private_name_is_imported_across_modules():
    """A name with a leading underscore is its module's own: another module that needs it gets a public name."""
    found = []
    for p in sorted((ROOT / "dit_core").rglob("*.py")) + sorted((ROOT / "launchers").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dit_core")):
                found += [f"{p.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert not found, "\n".join(found)
