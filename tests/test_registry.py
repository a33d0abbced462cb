"""A stage registered outside the package is a first-class stage.

`tests/stages/simmim.py` registers SimMIM with one `register_stage` call and nothing else in the package knows it.
These tests run it through every command a user has: `prepretrain train`, `export`, `prepretrain run` (papermill,
its stage notebook given by path, the module named by the experiment), `status` and `report`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from project import ROOT
STAGE_MODULE = ROOT / "tests" / "stages" / "simmim.py"
STAGE_NOTEBOOK = ROOT / "tests" / "stages" / "simmim.ipynb"
PRETRAIN = Path(sys.executable).parent / "prepretrain"
TINY = ["--preset", "tiny", "--set", "data.dataset=synthetic", "--set", "train.steps=2", "--set", "data.batch_size=8"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    "The installed console script, as a user runs it (without the stage module unless asked)."
    base = {k: v for k, v in os.environ.items() if k != "PREPRETRAIN_STAGE_MODULES"}
    return subprocess.run([str(PRETRAIN), *args], capture_output=True, text=True, timeout=600, env={**base, **(env or {})})


def test_help_lists_a_stage_only_when_its_module_is_named():
    assert "simmim" in cli("--stage-module", str(STAGE_MODULE), "train", "--help").stdout
    assert "simmim" not in cli("train", "--help").stdout
    evaluations = cli("evaluate", "--help").stdout
    assert all(kind in evaluations for kind in ("finetune", "linear_probe", "lowshot", "knn", "zeroshot"))


def test_an_outside_stage_trains_with_its_own_section_and_recipe_and_exports_its_trunk(tmp_path):
    out = tmp_path / "freely-named"
    res = cli("--stage-module", str(STAGE_MODULE), "train", "simmim", *TINY, "--set", "simmim.mask_ratio=0.5", "--out", str(out))
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stage"] == "simmim" and saved["simmim"] == {"mask_ratio": 0.5}
    assert saved["optim"]["base_lr"] == 2e-3                               # the stage's registered recipe

    res = cli("export", str(out), "--to", "safetensors", env={"PREPRETRAIN_STAGE_MODULES": str(STAGE_MODULE)})
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.vit import vit_from_config
    trunk = load_file(str(out / "export-safetensors" / "trunk.safetensors"))
    assert not any(k.startswith("simmim_") for k in trunk)                 # `not_trunk` of its spec
    vit_from_config(load_config(preset="tiny").model).load_state_dict(trunk, strict=True)


def test_without_its_module_an_outside_stage_is_named_with_the_way_in(tmp_path):
    res = cli("train", "simmim", *TINY, "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and not (tmp_path / "x").exists()
    assert "unknown stage 'simmim'" in res.stderr and "--stage-module" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_outside_stage_runs_in_an_experiment_with_status_and_report(tmp_path, digits_manifests):
    train, test = digits_manifests
    experiment = {
        "name": "outside", "stage_modules": [str(STAGE_MODULE)],
        "stages": {
            "pre": {"notebook": str(STAGE_NOTEBOOK), "params": {"steps": 2, "batch_size": 8}},
            "judge": {"notebook": "knn", "inputs": {"init_checkpoint": "pre/model.pt"},
                      "params": {"dataset": str(train), "eval_dataset": str(test), "batch_size": 64}}}}
    path = tmp_path / "outside.yaml"
    path.write_text(yaml.safe_dump(experiment))
    res = cli("run", str(path), "--out", str(tmp_path / "runs"), "--quiet")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folder = tmp_path / "runs" / "outside"
    assert (folder / "pre" / "main" / "model.pt").is_file() and (folder / "judge" / "main" / "results.json").is_file()

    status = cli("status", str(folder), env={"PREPRETRAIN_STAGE_MODULES": str(STAGE_MODULE)})
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert any("pre" in r and "complete" in r and "simmim" in r for r in rows), status.stdout

    report = cli("report", str(folder), "--out", str(tmp_path / "report"),
                 env={"PREPRETRAIN_STAGE_MODULES": str(STAGE_MODULE)})
    assert report.returncode == 0, report.stderr
    knn_rows = [line for line in report.stdout.splitlines() if line.startswith("knn")]
    trunk_rows = [line for line in knn_rows if " pixels " not in line]            # the raw-pixel arm stands beside it
    assert trunk_rows and all("SimMIM" in line for line in trunk_rows), report.stdout
