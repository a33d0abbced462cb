"""`make test` itself: each step catches what it promises to catch, names it, and leaves the tree as it was.

Every test works on a copy of the repository, so the real work tree is never touched.
"""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from project import ROOT
SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", ".pytest_cache", "*.egg-info", ".ipynb_checkpoints")


@pytest.fixture
def repo(tmp_path) -> Path:
    "A copy of the repository (without .venv, .git and runs)."
    dest = tmp_path / "repo"
    shutil.copytree(ROOT, dest, ignore=SKIP)
    return dest


def check(repo: Path, *steps: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(repo / "tools" / "check.py")] + [a for s in steps for a in ("--only", s)]
    return subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)


def first_notebook(repo: Path) -> Path:
    return repo / "nbs" / "00c_config.ipynb"


def test_a_clean_copy_passes_sync_and_clean(repo):
    res = check(repo, "sync", "clean")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checks: 2 passed, 0 failed" in res.stdout


def test_a_hand_edit_to_the_package_fails_sync_and_is_left_alone(repo):
    lib = repo / "prepretrain_lit" / "config.py"
    edited = lib.read_text() + "\nHAND_EDIT = True\n"
    lib.write_text(edited)
    res = check(repo, "sync")
    assert res.returncode == 1
    assert "FAILED sync" in res.stdout and "prepretrain_lit/config.py" in res.stdout
    assert "edit the notebook instead" in res.stdout and "+HAND_EDIT = True" not in res.stdout
    assert "-HAND_EDIT = True" in res.stdout  # the diff shows what export would remove
    assert lib.read_text() == edited           # make test reports; it does not rewrite


def test_a_new_hand_written_module_fails_sync(repo):
    (repo / "prepretrain_lit" / "extra.py").write_text("x = 1\n")
    res = check(repo, "sync")
    assert res.returncode == 1 and "prepretrain_lit/extra.py" in res.stdout


def test_a_stale_readme_fails_sync(repo):
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nhand-written line\n")
    res = check(repo, "sync")
    assert res.returncode == 1 and "README.md" in res.stdout


def test_a_notebook_with_outputs_metadata_fails_clean_and_is_left_alone(repo):
    nb_path = first_notebook(repo)
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"] = 3
    code["metadata"]["collapsed"] = True
    nb["metadata"]["widgets"] = {"state": {}}
    dirty = json.dumps(nb, indent=1)
    nb_path.write_text(dirty)
    res = check(repo, "clean")
    assert res.returncode == 1
    assert "FAILED clean" in res.stdout and "nbs/00c_config.ipynb" in res.stdout and "make clean-nbs" in res.stdout
    assert nb_path.read_text() == dirty


def _add_parameters_cell(nb_path: Path) -> None:
    nb = json.loads(nb_path.read_text())
    nb["cells"].insert(1, {"cell_type": "code", "execution_count": None, "id": "params01",
                           "metadata": {"tags": ["parameters"]}, "outputs": [], "source": ["steps = 10"]})
    nb_path.write_text(json.dumps(nb, indent=1) + "\n")
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(nb_path)],
                   cwd=nb_path.parents[1], check=True)


def test_nbdev_clean_keeps_papermills_parameters_tag(repo):
    nb_path = first_notebook(repo)
    _add_parameters_cell(nb_path)
    cell = json.loads(nb_path.read_text())["cells"][1]
    assert cell["metadata"] == {"tags": ["parameters"]}, "settings.ini must allow the `tags` cell metadata"
    assert check(repo, "clean").returncode == 0


def test_without_the_setting_nbdev_clean_would_strip_the_tag(repo):
    settings = repo / "settings.ini"
    settings.write_text(settings.read_text().replace("allowed_cell_metadata_keys = tags", "allowed_cell_metadata_keys ="))
    nb_path = first_notebook(repo)
    _add_parameters_cell(nb_path)
    assert json.loads(nb_path.read_text())["cells"][1]["metadata"] == {}


def _load_check_module(repo: Path):
    spec = importlib.util.spec_from_file_location("check", repo / "tools" / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytest_collecting_nothing_is_a_failure(repo, tmp_path):
    empty = tmp_path / "no_tests"
    empty.mkdir()
    ok, message = _load_check_module(repo).step_pytest(paths=(str(empty),))
    assert not ok and "collected no tests" in message


@pytest.mark.slow
def test_a_failing_notebook_fails_the_notebook_step(repo):
    nb_path = repo / "nbs" / "99_broken.ipynb"
    nb = json.loads(first_notebook(repo).read_text())
    nb["cells"] = [{"cell_type": "code", "execution_count": None, "id": "boom0001", "metadata": {}, "outputs": [],
                    "source": ["raise RuntimeError('this notebook is broken')"]}]
    nb_path.write_text(json.dumps(nb, indent=1) + "\n")
    for other in (repo / "nbs").rglob("*.ipynb"):
        if other != nb_path: other.unlink()
    res = check(repo, "notebooks")
    assert res.returncode == 1 and "FAILED notebooks" in res.stdout
    assert "99_broken.ipynb" in res.stdout + res.stderr and "this notebook is broken" in res.stdout + res.stderr


def test_stage_notebooks_carry_small_clean_outputs_of_a_tiny_run():
    "Each stage notebook shows what it produces (tools/stage_outputs.py), in a form nbdev_clean keeps as it is."
    for path in sorted((ROOT / "nbs" / "stages").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert sum(bool(c["outputs"]) for c in code) >= 1, f"{path.name}: no saved outputs"
        assert all(c.get("execution_count") is None for c in code), path.name
        assert not any(o.get("execution_count") for c in code for o in c["outputs"]), path.name
        assert not any(o["output_type"] == "error" for c in code for o in c["outputs"]), path.name
        assert not any("injected-parameters" in (c["metadata"].get("tags") or []) for c in nb["cells"]), path.name
        assert not any("papermill" in c["metadata"] for c in nb["cells"]) and "papermill" not in nb["metadata"], path.name
        text = path.read_text()
        assert "/tmp/" not in text and "stage-outputs-" not in text, f"{path.name}: a temporary path was saved"
        assert len(text) < 300_000, f"{path.name}: {len(text) // 1024} KB of outputs (keep figures small)"

