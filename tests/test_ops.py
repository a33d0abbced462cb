"""Runs a person can follow and steer: log lines without a terminal, `status` on every kind of run
folder, "resumed from step N of M", `train --extend`, JupyterLab set-up, a wheel that carries what the CLI needs,
and `export` of a trunk for timm."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prepretrain_lit.cli import main
from prepretrain_lit.run_folder import write_status

from project import ROOT
BIN = Path(sys.executable).parent
TINY = ["--preset", "tiny", "--set", "data.dataset=synthetic", "--set", "data.batch_size=4", "--set", "model.depth=2",
        "--set", "train.log_every=2", "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3"]
STEP_LINE = re.compile(r"step (\d+)/(\d+)\s+loss (\d+\.\d+)\s+lr \S+\s+\S+ img/s\s+ETA \S+")


def cli(*args: str) -> tuple[int, str, str]:
    "`prepretrain ARGS` in this process: (exit status, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def train_tiny(out: Path, steps: int, *extra: str) -> tuple[int, str, str]:
    return cli("train", "mae", *TINY, "--set", f"train.steps={steps}", "--out", str(out), *extra)


@pytest.fixture
def project_kernel(tmp_path, monkeypatch):
    "A `prepretrain-lit` kernel (what `make kernel` registers) for this interpreter, in a private JUPYTER_PATH."
    spec = tmp_path / "jupyter" / "kernels" / "prepretrain-lit" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                "display_name": "prepretrain-lit (.venv)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(spec.parents[2]))
    return spec


# -- 1. logs without a TTY, and status of a papermill-only folder ---------------------------------------------------
@pytest.mark.slow
def test_papermill_log_has_step_lines_and_status_reads_its_folder(tmp_path, project_kernel):
    "`papermill --log-output` (a SLURM log) shows a line per train.log_every steps with the loss; the kernel is the notebook's own."
    out_dir = tmp_path / "mae"
    res = subprocess.run([str(BIN / "papermill"), str(ROOT / "nbs/stages/mae.ipynb"), str(tmp_path / "executed.ipynb"),
                          "--log-output", "-p", "out_dir", str(out_dir), "-p", "steps", "6",
                          "-y", "overrides: [train.log_every=2, model.depth=2, data.batch_size=4]"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [m.groups() for m in STEP_LINE.finditer(res.stdout + res.stderr)]
    assert [(s, t) for s, t, _ in lines] == [("2", "6"), ("4", "6"), ("6", "6")], res.stderr[-3000:]
    assert all(float(loss) > 0 for *_, loss in lines)
    rc, text, _ = cli("status", str(out_dir))                 # a stage notebook's out_dir, no stage.json
    assert rc == 0 and "no stage runs found" not in text
    row = text.splitlines()[1].split()
    assert "complete" in row and "6/6" in row and row[-2:] == ["mae", "MAE"] and row[-3] == "ago", text   # kind, trunk


# -- 2. status of train and evaluate folders, and the error of a failed one ------------------------------------------
def test_status_reads_train_evaluate_and_failed_folders(tmp_path):
    assert train_tiny(tmp_path / "runs/train_a", 4)[0] == 0
    last_loss = json.loads((tmp_path / "runs/train_a/metrics.jsonl").read_text().splitlines()[-1])["loss"]
    failed = tmp_path / "runs/train_b"
    failed.mkdir(parents=True)
    write_status(failed, "failed", 3, "RuntimeError: CUDA out of memory (the message of the run)")
    evaluation = tmp_path / "runs/lowshot"        # what `prepretrain evaluate lowshot --out` leaves
    evaluation.mkdir()
    (evaluation / "results.json").write_text(json.dumps({"kind": "lowshot", "records": []}))
    rc, text, _ = cli("status", str(tmp_path / "runs"))
    assert rc == 1, text                          # a run ended badly
    rows = {line.split()[0]: line for line in text.splitlines()[1:4]}
    assert set(rows) == {"train_a", "train_b", "lowshot"}, text
    assert "complete" in rows["train_a"] and "4/4" in rows["train_a"] and f"{last_loss:.4f}" in rows["train_a"]
    assert re.search(r"\d+s ago", rows["train_a"])
    assert "failed" in rows["train_b"] and "complete" in rows["lowshot"]
    assert rows["lowshot"].split()[-1] == "lowshot"   # the kind its results.json records
    assert "train_b: RuntimeError: CUDA out of memory (the message of the run)" in text
    rc, text, _ = cli("status", str(tmp_path / "runs/train_a"))   # one run folder itself
    assert rc == 0 and "4/4" in text


# -- 3. resumed from step N of M --------------------------------------------------------------------------------------
def test_every_resume_says_where_it_starts(tmp_path):
    out = tmp_path / "run"
    assert train_tiny(out, 4)[0] == 0
    # as after a kill between the checkpoints of steps 2 and 4
    for p in [out / "model.pt", *(out / "checkpoints").glob("step_00000004*")]: p.unlink()
    rc, text, _ = train_tiny(out, 4)
    assert rc == 0 and "resumed from step 2 of 4" in text, text
    rc, text, _ = train_tiny(out, 4)
    assert rc == 0 and "resumed from step 4 of 4: the run is complete" in text


# -- 4. train --extend --------------------------------------------------------------------------------------------------
def test_extend_lengthens_a_finished_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    assert train_tiny(out, 4)[0] == 0
    rc, _, err = train_tiny(out, 8)
    assert rc == 2 and "--extend" in err and "train.steps=4" in err, err
    assert json.loads((out / "status.json").read_text())["state"] == "complete"    # a refusal does not mark it failed
    rc, _, err = train_tiny(out, 8, "--set", "mae.mask_ratio=0.6", "--extend")
    assert rc == 2 and "mae.mask_ratio" in err and "changes nothing else" in err, err
    rc, text, err = train_tiny(out, 8, "--extend")
    assert rc == 0, err
    assert "resumed from step 4 of 8 (extended from 4 steps)" in text
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    record, = json.loads((out / "extensions.json").read_text())
    assert (record["from_steps"], record["to_steps"], record["from_step"]) == (4, 8, 4)
    rc, _, err = train_tiny(out, 6, "--extend")
    assert rc == 2 and "would shorten it" in err


def test_a_checkpoint_of_another_config_still_refuses_even_after_an_extension(tmp_path):
    "Extension opens the folder to its own earlier config only: a checkpoint from any other config is refused."
    out = tmp_path / "run"
    assert train_tiny(out, 4)[0] == 0
    assert train_tiny(out, 6, "--extend")[0] == 0
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.checkpoint import extended_from
    from prepretrain_lit.presets import config_hash
    cfg6 = load_config(out / "config.yaml")
    assert len(extended_from(out, cfg6)) == 1
    other = load_config(out / "config.yaml", overrides=["seed=5"])
    assert extended_from(out, other) == set() and config_hash(other) != config_hash(cfg6)


# -- 5. JupyterLab: root, the project's kernel, ignored folders ---------------------------------------------------------
def test_make_lab_allows_root_and_registers_the_kernel():
    res = subprocess.run(["make", "-n", "lab", "STAMP=/dev/null"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lab = next(l for l in res.stdout.splitlines() if "jupyter lab" in l)
    assert ("--allow-root" in lab) == (os.geteuid() == 0)
    assert "ipykernel install --user --name prepretrain-lit" in res.stdout


def test_every_notebook_names_the_project_kernel():
    for path in sorted(ROOT.glob("nbs/**/*.ipynb")):
        spec = json.loads(path.read_text())["metadata"].get("kernelspec", {})
        assert spec.get("name") == "prepretrain-lit", f"{path}: kernelspec {spec}"


def test_data_and_runs_are_ignored():
    res = subprocess.run(["git", "check-ignore", "data/shapes/shapes.yaml", "runs/demo/stage.json"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.stdout.split() == ["data/shapes/shapes.yaml", "runs/demo/stage.json"]


# -- 7. export for timm --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["timm", "safetensors"])
def test_export_is_read_by_timm_and_gives_our_features(tmp_path, to):
    import timm
    from safetensors.torch import load_file
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.vit import load_trunk, vit_from_config
    run = tmp_path / "run"
    assert train_tiny(run, 2)[0] == 0
    rc, text, err = cli("export", str(run), "--to", to)
    assert rc == 0, err
    record = json.loads((run / f"export-{to}" / "export.json").read_text())
    assert record["timm_call"] in text and record["timm_call"] in (run / f"export-{to}" / "README.md").read_text()
    ours = load_trunk(vit_from_config(load_config(run / "config.yaml").model), run / "model.pt").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # no network: pretrained=False and the exported state dict, strictly
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **record["timm_model_args"])
    model.load_state_dict(load_file(record["weights"]), strict=True)
    # the printed call itself
    called = eval(record["timm_call"], {"timm": timm})
    with torch.no_grad():
        expected = ours.forward_features(images)
        for m in (model.eval(), called.eval()):
            torch.testing.assert_close(m.forward_features(images), expected, rtol=1e-5, atol=1e-5)


# -- 6. a wheel carries what the CLI needs ---------------------------------------------------------------------------
def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.mark.slow
def test_a_wheel_installed_outside_the_clone_runs_the_demo_dry_run(tmp_path):
    """Build the wheel from a copy of the working tree, install it (--no-deps) into a fresh virtual environment
    outside the clone whose dependencies come from the project's venv (a .pth line: no download, and the editable
    install's finder is not activated), then run the CLI from a folder outside the clone."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for name in filter(None, files):
        if not (ROOT / name).is_file(): continue
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    wheel, = (tmp_path / "dist").glob("prepretrain_lit-*.whl")
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("prepretrain_lit/_shipped/data_manifests/shapes.yaml", "prepretrain_lit/_shipped/stages/mae.ipynb",
                   "prepretrain_lit/_shipped/experiments/demo.yaml"):
        assert needed in names, f"{needed} not in {wheel.name}"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=600)
    (_site_packages(python) / "project_dependencies.pth").write_text(str(_site_packages(Path(sys.executable))) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(python), "-c", "import prepretrain_lit; print(prepretrain_lit.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    res = subprocess.run([str(venv / "bin" / "prepretrain"), "run", "demo", "--dry-run"], cwd=elsewhere,
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "== experiment demo:" in res.stdout and re.search(r"^mae/seed=0\s+mae\s", res.stdout, re.M), res.stdout[-2000:]
    shapes = subprocess.run([str(python), "-c", "from prepretrain_lit.data import shipped_manifest; "
                             "print(shipped_manifest('shapes'))"], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert Path(shapes.stdout.strip()).is_file() and Path(shapes.stdout.strip()).is_relative_to(venv), shapes.stdout


@pytest.mark.slow
def test_a_slurm_job_output_shows_the_step_lines(tmp_path, capfd):
    "What a SLURM job runs (`execute_run(..., log_output=True)`) prints the kernel's step lines to the job's output."
    from prepretrain_lit.pipeline_exec import execute_run
    from prepretrain_lit.pipeline_spec import expand, load_experiment
    (tmp_path / "exp.yaml").write_text("name: logs\nstages:\n  mae:\n    notebook: mae\n    params: {steps: 4, overrides: "
                                       "[train.log_every=1, model.depth=2, data.batch_size=4]}\n")
    run, = expand(load_experiment(tmp_path / "exp.yaml"), tmp_path / "runs")
    assert execute_run(run, log_output=True) == "complete"
    out = capfd.readouterr().out
    assert [m.group(1) for m in STEP_LINE.finditer(out)] == ["1", "2", "3", "4"], out[-2000:]


def test_report_prints_a_compact_results_table(tmp_path):
    from prepretrain_lit._fixtures import example_runs
    exp = example_runs(tmp_path / "runs", mae_model=False)
    rc, text, err = cli("report", str(exp), "--out", str(tmp_path / "report"))
    assert rc == 0, err
    lines = text.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:3] == ["kind", "dataset", "metric"])
    table = lines[head + 1:]
    probe = [l.split("  ") for l in table if l.startswith("linear_probe") and " top1 " in l and "vit_tiny_cpu" in l]
    recipes = {cells[-2].strip(): cells[-1] for cells in ([c for c in p if c] for p in probe) if cells[-1].endswith("(n=3)")}
    assert {"WSP", "MAE→WSP"} <= set(recipes) and all(re.fullmatch(r"\d+\.\d ± \d+\.\d \(n=3\)", v) for v in recipes.values()), text
    wsp = [l for l in table if l.startswith("wsp") and "final loss @ 200" in l]
    assert len(wsp) == 2 and all(l.endswith("(n=3)") for l in wsp), text       # one line per recipe, not per run


def test_a_stage_notebook_extends_through_the_environment(tmp_path, monkeypatch):
    "The papermill path: a stage notebook's `train` reads PREPRETRAIN_EXTEND=1 (the runner or the user sets it)."
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.checkpoint import EXTEND_ENV
    from prepretrain_lit.trainer import train
    cfg = lambda steps: load_config(preset="tiny", overrides=["data.dataset=synthetic", "data.batch_size=4", "model.depth=2",
                                                                f"train.steps={steps}", "train.log_every=2"])
    out = tmp_path / "mae"
    train("mae", cfg(2), out, progress=False)
    with pytest.raises(Exception, match=EXTEND_ENV):
        train("mae", cfg(4), out, progress=False)
    monkeypatch.setenv(EXTEND_ENV, "1")
    assert train("mae", cfg(4), out, progress=False)["step"] == 4


def test_the_venvs_papermill_finds_the_project_kernel_with_nothing_in_home(tmp_path):
    "`make install` registers the notebooks' kernel inside .venv: papermill runs a stage notebook on a fresh machine."
    from prepretrain_lit.pipeline_stage import write_stage_notebook
    notebook = write_stage_notebook(tmp_path / "in.ipynb", "x = 1", ["print('x + 1 =', x + 1)"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env["HOME"] = str(tmp_path / "empty-home")                    # no user-level kernels (no `make kernel`)
    res = subprocess.run([str(Path(sys.executable).parent / "papermill"), str(notebook), str(tmp_path / "out.ipynb"),
                          "-k", "prepretrain-lit", "-p", "x", "2", "--log-output"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "x + 1 = 3" in (tmp_path / "out.ipynb").read_text()


def test_status_shows_the_last_logged_step_and_the_newest_checkpoint_between_checkpoints(tmp_path):
    "status.json is written at checkpoints; metrics.jsonl at every log line: status shows the later of the two."
    from prepretrain_lit.presets import load_config, save_config
    from prepretrain_lit.pipeline import format_status, status_rows
    run = tmp_path / "mae"
    run.mkdir()
    save_config(load_config(preset="tiny", stage="mae", overrides=["train.steps=2000"]), run / "config.yaml")
    write_status(run, "killed", 0, "the kernel died")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(25, 52)))
    (run / "checkpoints").mkdir()
    for step in (20, 40): (run / "checkpoints" / f"step_{step:08d}.pt").write_bytes(b"")
    (row,) = status_rows(run)
    assert (row["step"], row["total"], row["checkpoint"]) == (51, 2000, 40)
    assert "51/2000 (ckpt 40)" in format_status([row])
