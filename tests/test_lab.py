"""A chapter opens as a notebook in JupyterLab, as README.md and book/how_to_run.md promise: with the
`lab` extra installed (JupyterLab and jupytext), the server's contents manager is jupytext's, so the
MyST-markdown chapters are served as notebooks. The test starts JupyterLab headless on 127.0.0.1 with a
token, asks its REST contents API for a chapter as a notebook, and stops it again (about 10 s; bounded)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "notebooks/01_foundations.md"
START_TIMEOUT_S = 40


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str, timeout: float = 10):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read().decode("utf-8"))


@pytest.fixture
def lab_server(tmp_path):
    """JupyterLab in the repository root, headless; yields (base url, token)."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed: pip install -e '.[lab]' "
                                             "(requirements.txt installs it too)")
    pytest.importorskip("jupyter_server", reason="jupyter_server is not installed")
    token, port = secrets.token_hex(16), _free_port()
    # the user's own Jupyter configuration, workspaces and runtime files stay out of it; the environment's
    # configuration (<venv>/etc/jupyter, where jupytext registers its server extension) is still read
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "run"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log_path = tmp_path / "lab.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={ROOT}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _get(f"{base}/api/status", token, timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
        yield base, token, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_chapter_opens_as_notebook_in_jupyterlab(lab_server):
    import jupytext
    import nbformat

    base, token, log_path = lab_server
    try:
        status, model = _get(f"{base}/api/contents/{CHAPTER}?type=notebook&content=1", token, timeout=10)
    except urllib.error.HTTPError as error:
        pytest.fail(f"the contents API refused {CHAPTER} as a notebook ({error.code}: {error.read()[:500]!r}); "
                    f"is jupytext's contents manager active?\n{log_path.read_text()[-3000:]}")
    assert status == 200
    assert model["type"] == "notebook" and model["format"] == "json", model["type"]
    nb = nbformat.from_dict(model["content"])
    nbformat.validate(nb)
    served = [c.source for c in nb.cells if c.cell_type == "code"]
    expected = [c.source for c in jupytext.read(ROOT / CHAPTER).cells if c.cell_type == "code"]
    assert served, "the notebook JupyterLab serves has no code cells"
    assert served[0] == expected[0]
    assert len(served) == len(expected)
