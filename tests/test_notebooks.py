"""The chapters: each notebooks/NN_name.py (the source) agrees with its executed .ipynb, and JupyterLab,
as `make lab` starts it, lists them and runs code in its kernel."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
CHAPTERS = sorted(p.stem for p in NB.glob("[0-9][0-9]_*.ipynb"))


def pair_problems(py: Path, ipynb: Path) -> list[str]:
    """Why a chapter's script and notebook are not one chapter (empty: they are), each with the fix."""
    fix = f"run `make sync` (jupytext --sync {py.relative_to(py.parents[1])}) to bring the older one up to date"
    if not py.is_file() or not ipynb.is_file():
        return [f"{py.stem}: {'the script' if not py.is_file() else 'the notebook'} is missing; {fix}."]
    a = [(c.cell_type, c.source) for c in jupytext.read(py).cells]
    b = [(c.cell_type, c.source) for c in nbformat.read(ipynb, as_version=4).cells]
    if len(a) != len(b):
        return [f"{py.stem}: the script has {len(a)} cells and the notebook {len(b)}; {fix}."]
    return [f"{py.stem}: cell {i} differs between {py.name} and {ipynb.name}; {fix}."
            for i, (x, y) in enumerate(zip(a, b)) if x != y]


def test_every_chapter_is_a_pair():
    scripts = sorted(p.stem for p in NB.glob("[0-9][0-9]_*.py"))
    assert scripts == CHAPTERS and len(CHAPTERS) >= 12
    problems = [m for ch in CHAPTERS for m in pair_problems(NB / f"{ch}.py", NB / f"{ch}.ipynb")]
    assert not problems, "\n".join(problems)


def test_a_changed_script_is_caught(tmp_path):
    # The negative check beside the positive one: edit one line of a copy, the check names the chapter.
    py, ipynb = tmp_path / "00_setup.py", tmp_path / "00_setup.ipynb"
    shutil.copy(NB / "00_setup.ipynb", ipynb)
    text = (NB / "00_setup.py").read_text()
    py.write_text(text)
    assert pair_problems(py, ipynb) == []
    py.write_text(text.replace("# # 00 · Setup", "# # 00 · Set-up", 1))
    (msg,) = pair_problems(py, ipynb)
    assert "00_setup: cell 0 differs" in msg and "jupytext --sync" in msg


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_committed_notebook_is_executed_and_checked(chapter):
    nb = nbformat.read(NB / f"{chapter}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # Learners read outputs on the web: every code cell ran, in order, in one kernel session.
    assert all(c.execution_count is not None for c in code), f"{chapter}: run `make notebooks CH={chapter[:2]}`"
    counts = [c.execution_count for c in code]
    assert counts == sorted(counts)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{chapter} has an error output"
    # Each chapter proves something: at least one verdict cell that nbval compares.
    assert any("# NBVAL_CHECK_OUTPUT" in c.source for c in code)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_jupyterlab_lists_the_chapters_and_runs_code_in_its_kernel(tmp_path):
    """What `make lab` starts, headless: the server lists the chapters, and a kernel it starts imports
    this project from this environment."""
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    from dit_core.parallel.dist import free_port

    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        pytest.fail(f"{jupyter} is missing: install the notebooks extra (make venv) to open the chapters.")
    port, token = free_port(), uuid.uuid4().hex
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    server = subprocess.Popen([str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={NB}",
                               *(["--allow-root"] if os.geteuid() == 0 else [])],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                listing = _get(f"{base}/api/contents?token={token}")
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not answer within 60 s")
        names = {item["name"] for item in listing["content"]}
        assert {f"{ch}.ipynb" for ch in CHAPTERS} <= names

        req = urllib.request.Request(f"{base}/api/kernels?token={token}", data=b'{"name": "python3"}',
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            kernel = json.loads(r.read())

        async def execute(code: str) -> str:
            ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels?token={token}")
            msg_id = uuid.uuid4().hex
            await ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                           "session": uuid.uuid4().hex, "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell",
                "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                            "allow_stdin": False}}))
            out = []
            while True:
                m = json.loads(await ws.read_message())
                if m.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if m["msg_type"] == "stream":
                    out.append(m["content"]["text"])
                elif m["msg_type"] == "error":
                    out.append("ERROR " + m["content"]["ename"])
                elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    ws.close()
                    return "".join(out)

        printed = IOLoop.current().run_sync(
            lambda: execute("import sys, dit_core, torch; print(sys.prefix); print(dit_core.__file__)"), timeout=120)
        prefix, module = printed.split()
        assert Path(prefix) == Path(sys.prefix)                 # the kernel runs in this environment
        assert Path(module).resolve().is_relative_to(ROOT)      # and imports this checkout's dit_core
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
