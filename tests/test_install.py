"""The package installed as a user installs it: a wheel in a fresh venv, run from another folder.

Needs no network: the wheel is built from this checkout without build isolation, installed with
--no-deps, and the venv finds the dependencies in this test environment's site-packages (given
by PYTHONPATH; the checkout itself is not on it). Marked ``install``: ``-m "not install"`` skips
it (it takes some seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.install
def test_a_wheel_in_a_fresh_venv_runs_the_demo_and_init_from_any_folder(tmp_path):
    def run(*command: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs
        )
        assert done.returncode == 0, done.stderr
        return done

    source = tmp_path / "source"  # a copy: building leaves build/ and egg-info behind it
    ignore = shutil.ignore_patterns(".*", "build", "out", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignore)
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
        "--quiet", "--wheel-dir", tmp_path / "dist")  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("imagelist_pipeline-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(
        venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dependencies = str(Path(requests.__file__).resolve().parents[1])  # requests, PIL, tqdm...
    env = {**os.environ, "PYTHONPATH": dependencies}
    where = run(venv / "bin" / "python", "-c", "import pipeline; print(pipeline.__file__)",
                cwd=elsewhere, env=env)  # fmt: skip
    assert where.stdout.strip().startswith(str(venv))  # the installed copy, not the checkout
    # a name no other project uses: the install hints name it
    named = run(venv / "bin" / "python", "-c",
                "import importlib.metadata as m, pipeline.errors as e; "
                "print(m.version(e.DISTRIBUTION), e.install_hint('distributed', 'dask', 'x'))",
                cwd=elsewhere, env=env)  # fmt: skip
    assert named.stdout.startswith("0.1.0 ")
    assert 'pip install "imagelist-pipeline[dask]"' in named.stdout

    run(venv / "bin" / "pipeline", "demo", "--out", "demo", "-q", cwd=elsewhere, env=env)
    report = json.loads((elsewhere / "demo" / "report.json").read_text())
    assert (report["ok"], sum(report["failed"].values())) == (42, 2)

    run(venv / "bin" / "pipeline", "init", cwd=elsewhere, env=env)
    assert (elsewhere / "config.toml").read_text() == (ROOT / "config.toml").read_text()
