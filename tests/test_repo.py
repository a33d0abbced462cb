"""The repository's own promises: the layout, CI calling the README's test command, the nbdev settings."""
import configparser
import re

from project import ROOT


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]


def test_layout():
    for folder in ("nbs", "nbs/stages", "prepretrain_lit", "data_manifests", "tests", "experiments", "benchmarks", "tools"):
        assert (ROOT / folder).is_dir(), folder
    for file in ("settings.ini", "setup.py", "environment.yml", "requirements.lock", "Makefile", ".ci/run",
                 "README.md", "nbs/index.ipynb", "nbs/00c_config.ipynb", "LICENSE"):
        assert (ROOT / file).is_file(), file


def test_ci_runs_the_readmes_test_command_and_nothing_else():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert commands[-1] == "exec make test"
    assert all(c.startswith(("set ", "cd ")) for c in commands[:-1]), commands
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.MULTILINE) and re.search(r"^make demo\b", readme, re.MULTILINE)


def test_nbdev_settings():
    s = settings()
    assert s["lib_name"] == "prepretrain_lit" and s["lib_path"] == "prepretrain_lit" and s["nbs_path"] == "nbs"
    assert "tags" in s["allowed_cell_metadata_keys"].split()   # papermill's parameters tag survives nbdev_clean
    assert set(s["tst_flags"].split()) == {"gpu", "multiproc", "slow"}
    assert s["console_scripts"] == "prepretrain=prepretrain_lit.cli:main"
    assert s["update_pyproject"] == "False"


def test_makefile_builds_the_venv_for_both_commands():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: \$\(STAMP\)", makefile, re.MULTILINE), f"`make {target}` must depend on the install"
    assert "-r requirements.lock" in makefile and "--no-deps" in makefile


def test_every_exported_notebook_has_its_module():
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text())
        if m: assert (ROOT / "prepretrain_lit" / (m.group(1).replace(".", "/") + ".py")).is_file(), nb.name
