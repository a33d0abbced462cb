"""The pipeline: experiment files, grid expansion into a DAG, validation before running, the local runner
(skip-if-done, resume, failures that block only their dependents), the SLURM submission, and every
stage notebook executed with tiny parameters."""
import json
import os
import stat
from unittest import mock
from pathlib import Path

import pandas as pd
import pytest
import yaml

from prepretrain_lit.cli import main
from prepretrain_lit.schema import UserError
from prepretrain_lit.pipeline_stage import STAGES_DIR, notebook_parameters, write_stage_notebook
from prepretrain_lit.pipeline_spec import EXPERIMENTS_DIR, expand, load_experiment, parse_experiment
from prepretrain_lit.pipeline_exec import StageJob, slurm_job_params, submit_slurm
from prepretrain_lit.pipeline_plan import format_dag
from prepretrain_lit.pipeline import run_experiment

from project import ROOT
OUT = 'out_dir = "."  # the run folder\n'


@pytest.fixture
def stages(tmp_path) -> Path:
    "Tiny stage notebooks: `train` writes model.pt (and fails on demand), `evaluate` reads it, `report` lists runs."
    d = tmp_path / "stages"
    write_stage_notebook(d / "train.ipynb", OUT + "seed = 0  # seed\nmodel = 'b'  # size\nsteps = 10  # steps\nfail = False  # raise on purpose",
                         ["assert not fail, f'failing on purpose (seed {seed})'",
                          "import pathlib; pathlib.Path(out_dir, 'model.pt').write_text(f'{model} {seed} {steps}')"])
    write_stage_notebook(d / "evaluate.ipynb", OUT + "checkpoint = None  # a model.pt",
                         ["import pathlib; pathlib.Path(out_dir, 'results.json').write_text(pathlib.Path(checkpoint).read_text())"])
    write_stage_notebook(d / "report.ipynb", OUT + "runs = None  # the experiment folder",
                         ["import pathlib; pathlib.Path(out_dir, 'summary.md').write_text(str(sorted(pathlib.Path(runs).rglob('results.json'))))"])
    return d


def experiment(*_, **changes) -> dict:
    data = {"name": "toy", "defaults": {"steps": 5}, "grid": {"model": ["b", "l"], "seed": [0, 1]},
            "stages": {"train": {"notebook": "train", "over": ["model", "seed"], "params": {"model": "{model}", "seed": "{seed}"}},
                       "eval": {"notebook": "evaluate", "inputs": {"checkpoint": "train/model.pt"}},
                       "report": {"notebook": "report", "params": {"runs": "{experiment_dir}"}, "after": ["eval"]}}}
    data.update(changes)
    return data


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- expansion ------------------------------------------------------------------------------------------------

def test_grid_expands_into_a_dag_matched_on_shared_axes(stages, tmp_path):
    runs = expand(parse_experiment(experiment(stages), stages_dir=stages), tmp_path / "runs")
    ids = [r.id for r in runs]
    assert ids[:4] == ["train/model=b,seed=0", "train/model=b,seed=1", "train/model=l,seed=0", "train/model=l,seed=1"]
    by_id = {r.id: r for r in runs}
    ev = by_id["eval/model=l,seed=1"]                      # eval inherits both axes from its input
    assert ev.deps == ["train/model=l,seed=1"]
    assert ev.params["checkpoint"] == str((tmp_path / "runs/toy/train/model=l,seed=1/model.pt").resolve())
    assert by_id["train/model=l,seed=1"].params == {"steps": 5, "model": "l", "seed": 1,
                                                    "out_dir": str((tmp_path / "runs/toy/train/model=l,seed=1").resolve())}
    assert by_id["report/main"].deps == [f"eval/model={m},seed={s}" for m in "bl" for s in (0, 1)]
    assert by_id["report/main"].params["runs"] == str((tmp_path / "runs/toy").resolve())
    assert ids.index("report/main") == len(ids) - 1 and all(ids.index(d) < ids.index(r.id) for r in runs for d in r.deps)
    assert len({r.hash for r in runs}) == len(runs)
    # the hash does not depend on where the runs go, and changes downstream when a parameter changes upstream
    again = {r.id: r.hash for r in expand(parse_experiment(experiment(stages), stages_dir=stages), tmp_path / "elsewhere")}
    assert again == {r.id: r.hash for r in runs}
    changed = {r.id: r.hash for r in expand(parse_experiment(experiment(stages), stages_dir=stages), tmp_path / "runs", ["train.steps=6"])}
    assert all(changed[i] != again[i] for i in changed)
    print(format_dag(runs))


def test_variants_exclude_and_optional_inputs(stages, tmp_path):
    data = experiment(stages, grid={"length": [0, 0.1, 1.0]}, stages={
        "pre": {"notebook": "train", "over": ["length"], "exclude": [{"length": 0}], "params": {"steps": "{length}"}},
        "wsp": {"notebook": "evaluate", "over": ["length"], "inputs": {"checkpoint": "pre/model.pt?"}},
        "two": {"notebook": "evaluate", "variants": {"scratch": {"axes": {"init": "scratch"}},
                                                     "from_pre": {"axes": {"init": "pre"}, "inputs": {"checkpoint": "pre/model.pt"}}}}})
    runs = {r.id: r for r in expand(parse_experiment(data, stages_dir=stages), tmp_path)}
    assert [i for i in runs if i.startswith("pre/")] == ["pre/length=0.1", "pre/length=1"]
    assert runs["pre/length=0.1"].params["steps"] == 0.1                       # typed, not "0.1"
    assert "checkpoint" not in runs["wsp/length=0"].params and runs["wsp/length=0"].deps == []
    assert runs["wsp/length=1"].deps == ["pre/length=1"]
    # the explicit variant `from_pre` maps over pre's two runs; `scratch` has no input
    assert sorted(i for i in runs if i.startswith("two/")) == ["two/from_pre,length=0.1", "two/from_pre,length=1", "two/scratch"]
    assert runs["two/from_pre,length=1"].axes == {"init": "pre", "length": 1.0}


def test_overrides_set_parameters_stage_parameters_and_axes(stages, tmp_path):
    exp = parse_experiment(experiment(stages), stages_dir=stages)
    runs = expand(exp, tmp_path, ["seed=[7]", "model=b", "train.steps=3", "checkpoint=x"])
    assert [r.id for r in runs] == ["train/model=b,seed=7", "eval/model=b,seed=7", "report/main"]
    assert runs[0].params["steps"] == 3 and runs[0].params["seed"] == 7
    assert runs[1].params["checkpoint"].endswith("model.pt")                  # an input wins over a global --set
    runs = expand(exp, tmp_path, ["train.steps=4", "steps=3"])                # one stage's --set beats every stage's
    assert runs[0].params["steps"] == 4


# -- validation ---------------------------------------------------------------------------------------------

BAD = [
    ({"stages": {"a": {"notebook": "trian"}}}, ["toy.yaml", "stages.a.notebook", "unknown stage notebook 'trian'", "evaluate, report, train"]),
    ({"stages": {"a": {"notebook": "train", "params": {"step": 3}}}}, ["toy.yaml", "stages.a.params", "'step'", "did you mean 'steps'", "out_dir, seed, model, steps, fail"]),
    ({"stages": {"a": {"notebook": "evaluate", "inputs": {"checkpoint": "b/model.pt"}}}}, ["toy.yaml", "stages.a.inputs.checkpoint", "unknown stage 'b'", "stages: a"]),
    ({"stages": {"a": {"notebook": "evaluate", "inputs": {"ckpt": "b/model.pt"}}, "b": {"notebook": "train"}}}, ["stages.a.inputs", "unknown parameter 'ckpt'", "checkpoint"]),
    ({"stages": {"a": {"notebook": "train", "after": ["b"]}, "b": {"notebook": "train", "after": ["a"]}}}, ["toy.yaml", "cycle", "a -> b -> a"]),
    ({"stages": {"a": {"notebook": "train", "over": ["sed"]}}}, ["stages.a.over", "unknown grid axis 'sed'", "model, seed"]),
    ({"stages": {"a": {"notebook": "train", "parms": {}}}}, ["stages.a.parms", "did you mean 'params'", "notebook, params, inputs"]),
    ({"stages": {"a": {"notebook": "train", "params": {"seed": "{sed}"}}}}, ["stages.a.params", "'{sed}'"]),
    ({"stagez": {}}, ["toy.yaml", "unknown key 'stagez'", "did you mean 'stages'"]),
]


@pytest.mark.parametrize("changes,expected", BAD, ids=[e[1][-1] for e in BAD])
def test_bad_experiments_are_refused_before_anything_runs(stages, tmp_path, changes, expected):
    data = {"name": "toy", "grid": {"model": ["b"], "seed": [0]}, **changes}
    path = write_yaml(tmp_path / "toy.yaml", data)
    with pytest.raises(UserError) as e:
        run_experiment(path, out=tmp_path / "runs", stages_dir=stages, echo=lambda s: None)
    for piece in expected: assert piece in str(e.value), (piece, str(e.value))
    assert not (tmp_path / "runs").exists()


def test_unknown_override_and_missing_parameters_cell(stages, tmp_path):
    path = write_yaml(tmp_path / "toy.yaml", experiment(stages))
    with pytest.raises(UserError, match="--set stepz: no stage of toy has such a parameter or grid axis; valid: .*steps"):
        run_experiment(path, out=tmp_path / "runs", overrides=["stepz=3"], stages_dir=stages, echo=lambda s: None)
    untagged = stages / "evaluate.ipynb"
    nb = json.loads(untagged.read_text())
    nb["cells"][0]["metadata"] = {}
    untagged.write_text(json.dumps(nb))
    with pytest.raises(UserError, match=r"evaluate.ipynb: no cell tagged 'parameters'.*papermill would ignore"):
        run_experiment(path, out=tmp_path / "runs", stages_dir=stages, echo=lambda s: None)
    assert not (tmp_path / "runs").exists()


def test_cli_reports_bad_experiments_in_one_line(stages, tmp_path, capsys):
    path = write_yaml(tmp_path / "toy.yaml", experiment(stages, stages={"a": {"notebook": "nope"}}))
    assert main(["run", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepretrain: error: ") and "unknown stage notebook 'nope'" in err and "mae" in err


# -- the local runner -----------------------------------------------------------------------------------------

def stage_json(folder: Path) -> dict:
    return json.loads((folder / "stage.json").read_text())


def test_failure_blocks_dependents_not_siblings_then_skip_and_resume(stages, tmp_path, capsys):
    data = experiment(stages, grid={"model": ["b"], "seed": [0, 1]})
    data["stages"]["train"]["params"]["fail"] = False
    path = write_yaml(tmp_path / "toy.yaml", data)
    out = tmp_path / "runs"
    # seed 1 fails: its eval and the report are blocked, seed 0's branch goes on
    outcomes = run_experiment(path, out=out, overrides=["train.fail=true"], stages_dir=stages, progress=False)
    assert {o.run.id: o.state for o in outcomes} == {
        "train/model=b,seed=0": "failed", "train/model=b,seed=1": "failed",
        "eval/model=b,seed=0": "blocked", "eval/model=b,seed=1": "blocked", "report/main": "blocked"}
    outcomes = run_experiment(path, out=out, stages_dir=stages, progress=False, force=True)   # hashes changed: --force
    states = {o.run.id: o.state for o in outcomes}
    assert set(states.values()) == {"complete"}

    root = out / "toy"
    record = stage_json(root / "eval/model=b,seed=1")
    assert record["state"] == "complete" and record["kind"] == "evaluate" and record["experiment"] == "toy"
    assert record["axes"]["seed"] == 1 and record["axes"]["model"] == "b" and record["axes"]["init"] is None
    assert record["inputs"]["checkpoint"].endswith("train/model=b,seed=1/model.pt") and record["started"] and record["finished"]
    assert (root / "eval/model=b,seed=1/results.json").read_text() == "b 1 5"
    assert "results.json" in (root / "report/main/summary.md").read_text()

    # skip-if-done: nothing executes again
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("executed.ipynb")}
    outcomes = run_experiment(path, out=out, stages_dir=stages, progress=False)
    assert {o.state for o in outcomes} == {"skipped"}
    assert stamps == {p: p.stat().st_mtime_ns for p in root.rglob("executed.ipynb")}

    # an interrupted run (stage.json says running) is run again, and only it
    rec = stage_json(root / "train/model=b,seed=0")
    (root / "train/model=b,seed=0/stage.json").write_text(json.dumps({**rec, "state": "running"}))
    outcomes = run_experiment(path, out=out, stages_dir=stages, progress=False)
    assert [o.run.id for o in outcomes if o.state == "complete"] == ["train/model=b,seed=0"]

    # a changed parameter is refused until --force
    with pytest.raises(UserError, match="completed with other parameters.*--force"):
        run_experiment(path, out=out, overrides=["train.steps=6"], stages_dir=stages, progress=False)


def test_failed_stage_keeps_its_notebook_and_status_shows_it(stages, tmp_path, capsys):
    data = experiment(stages, grid={"model": ["b"], "seed": [0, 1]})
    data["stages"]["train"]["params"]["fail"] = "{seed}"        # seed 1 fails
    path = write_yaml(tmp_path / "toy.yaml", data)
    outcomes = run_experiment(path, out=tmp_path / "runs", stages_dir=stages, progress=False)
    states = {o.run.id: o.state for o in outcomes}
    assert states == {"train/model=b,seed=0": "complete", "train/model=b,seed=1": "failed",
                      "eval/model=b,seed=0": "complete", "eval/model=b,seed=1": "blocked", "report/main": "blocked"}
    failed = tmp_path / "runs/toy/train/model=b,seed=1"
    executed = json.loads((failed / "executed.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and errors[0]["ename"] == "AssertionError" and "failing on purpose (seed 1)" in errors[0]["evalue"]
    assert stage_json(failed)["state"] == "failed" and "failing on purpose" in stage_json(failed)["error"]
    assert not (tmp_path / "runs/toy/eval/model=b,seed=1").exists()
    summary = capsys.readouterr().out
    assert "1 failed" in summary and str(failed / "executed.ipynb") in summary
    assert main(["status", str(tmp_path / "runs/toy")]) == 1
    table = capsys.readouterr().out
    assert "train  model=b,seed=1  failed" in table and "failing on purpose (seed 1)" in table


def test_preempted_stage_is_preempted_and_resumes(tmp_path):
    "A trainer that stops on a signal leaves status.json 'preempted'; the next run continues it."
    d = tmp_path / "stages"
    write_stage_notebook(d / "train.ipynb", OUT + "steps = 4  # steps", [
        "import json, pathlib\nout = pathlib.Path(out_dir)\n"
        "if not (out / 'checkpoint').exists():\n"
        "    (out / 'checkpoint').write_text('2')\n"
        "    (out / 'status.json').write_text(json.dumps({'state': 'preempted', 'step': 2}))\n"
        "    raise SystemExit(3)\n"
        "(out / 'model.pt').write_text('resumed from ' + (out / 'checkpoint').read_text())"])
    write_stage_notebook(d / "evaluate.ipynb", OUT + "checkpoint = None  # a model.pt", ["print(open(checkpoint).read())"])
    path = write_yaml(tmp_path / "x.yaml", {"name": "x", "stages": {"train": {"notebook": "train"},
                                                                    "eval": {"notebook": "evaluate", "inputs": {"checkpoint": "train/model.pt"}}}})
    first = run_experiment(path, out=tmp_path / "runs", stages_dir=d, progress=False, echo=lambda s: None)
    assert [o.state for o in first] == ["preempted", "blocked"]
    assert stage_json(tmp_path / "runs/x/train/main")["state"] == "preempted"
    second = run_experiment(path, out=tmp_path / "runs", stages_dir=d, progress=False, echo=lambda s: None)
    assert [o.state for o in second] == ["complete", "complete"]
    assert (tmp_path / "runs/x/train/main/model.pt").read_text() == "resumed from 2"


def test_only_runs_one_stage_and_needs_its_inputs(stages, tmp_path):
    path = write_yaml(tmp_path / "toy.yaml", experiment(stages, grid={"model": ["b"], "seed": [0]}))
    with pytest.raises(UserError, match=r"--only eval: its inputs are not complete: train/model=b,seed=0"):
        run_experiment(path, out=tmp_path / "runs", only="eval", stages_dir=stages, echo=lambda s: None)
    assert [o.state for o in run_experiment(path, out=tmp_path / "runs", only="train", stages_dir=stages, progress=False)] == ["complete"]
    assert [o.run.id for o in run_experiment(path, out=tmp_path / "runs", only="eval", stages_dir=stages, progress=False)] == ["eval/model=b,seed=0"]
    assert not (tmp_path / "runs/toy/report").exists()


# -- SLURM ------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    "`sbatch` and `srun` on PATH: sbatch keeps each script it is given and answers with a new job id."
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir(); scripts.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
n=$(( $(ls {scripts} | wc -l) + 100 ))
cp "$1" {scripts}/$n.sh
echo "Submitted batch job $n"
""")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "squeue").write_text('#!/bin/sh\n[ "$3" = "101" ] && echo PENDING\nexit 0\n')   # job 101 is still queued
    for f in bin_dir.iterdir(): f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_slurm_jobs_carry_resources_and_afterok_dependencies(stages, tmp_path, fake_slurm):
    data = experiment(stages, grid={"model": ["b"], "seed": [0]},
                      resources={"partition": "learnfair", "account": "mae", "gpus_per_node": 8, "cpus_per_node": 80, "time_min": 600})
    data["stages"]["train"]["resources"] = {"nodes": 2}
    data["stages"]["report"]["resources"] = {"gpus_per_node": 0}
    write_stage_notebook(stages / "train.ipynb", OUT + "seed = 0  # seed\nmodel = 'b'  # size\nnprocs = 1  # processes")
    runs = expand(parse_experiment(data, stages_dir=stages), tmp_path / "runs")
    outcomes = submit_slurm(runs, {"account": "other", "partition": None}, echo=lambda s: None)
    assert [o.state for o in outcomes] == ["submitted"] * 3
    scripts = {n: (fake_slurm / f"{n}.sh").read_text() for n in (100, 101, 102)}
    train, ev, report = scripts[100], scripts[101], scripts[102]
    for line in ["#SBATCH --partition=learnfair", "#SBATCH --account=other", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=10", "#SBATCH --time=600",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120"]:
        assert line in train, line
    assert "--dependency" not in train
    assert "#SBATCH --dependency=afterok:100" in ev and "#SBATCH --kill-on-invalid-dep=yes" in ev and "#SBATCH --nodes=1" in ev
    assert "#SBATCH --ntasks-per-node=1" in ev and "#SBATCH --cpus-per-task=80" in ev     # one task gets the node's CPUs
    assert "#SBATCH --dependency=afterok:101" in report and "gpus-per-node" not in report
    assert all(stage_json(r.folder)["state"] == "pending" for r in runs)
    assert stage_json(runs[1].folder)["job_id"] == "101"
    # one node: the notebook starts one process per GPU; several: one SLURM task per GPU, each nprocs=1
    assert slurm_job_params(runs[0])["nprocs"] == 1
    one_node = expand(parse_experiment({**data, "stages": {"train": {**data["stages"]["train"], "resources": {}}}}, stages_dir=stages), tmp_path / "r2")
    assert slurm_job_params(one_node[0])["nprocs"] == 8
    # submitting again: job 101 (eval) is still queued and is kept; the others are gone and are submitted again
    again = submit_slurm(runs, echo=lambda s: None)
    assert [o.note for o in again] == ["job 103", "job 101 (queued before)", "job 104 after 101"]
    assert "#SBATCH --dependency=afterok:101" in (fake_slurm / "104.sh").read_text()


def test_slurm_skips_complete_runs_and_the_job_runs_the_stage(stages, tmp_path, fake_slurm):
    data = experiment(stages, grid={"model": ["b"], "seed": [0]})
    runs = expand(parse_experiment(data, stages_dir=stages), tmp_path / "runs")
    assert StageJob()(runs[0]) == "complete"                         # what the job does on its node
    assert stage_json(runs[0].folder)["state"] == "complete"
    outcomes = submit_slurm(runs, echo=lambda s: None)
    assert [o.state for o in outcomes] == ["skipped", "submitted", "submitted"]
    assert "--dependency" not in (fake_slurm / "100.sh").read_text()    # its input is done: nothing to wait for
    assert StageJob().checkpoint(runs[1]).args == (runs[1],)             # requeued with the same run
    bad = expand(parse_experiment(data, stages_dir=stages), tmp_path / "bad", ["train.fail=true"])[0]
    with pytest.raises(RuntimeError, match="failed: see .*executed.ipynb"):
        StageJob()(bad)                                                  # a failed run fails its job: afterok holds


# -- the stage notebooks -------------------------------------------------------------------------------------

def test_every_stage_notebook_has_one_parameters_cell_with_out_dir():
    kinds = sorted(p.stem for p in STAGES_DIR.glob("*.ipynb"))
    for kind in ("shards", "mae", "splitmask", "wsp", "finetune", "linear_probe", "lowshot", "zeroshot"):
        assert kind in kinds
    for kind in kinds:
        params = notebook_parameters(STAGES_DIR / f"{kind}.ipynb")
        assert "out_dir" in params, kind
        undocumented = [p.name for p in params.values() if not p.help]
        assert not undocumented, (kind, undocumented)
        nb = json.loads((STAGES_DIR / f"{kind}.ipynb").read_text())
        assert not any("default_exp" in "".join(c["source"]) for c in nb["cells"]), f"{kind} must not export"


def test_shipped_experiments_validate():
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    assert {"demo", "model_scaling", "data_scaling", "mae_length", "splitmask_vs_mae"} <= set(names)
    counts = {}
    for name in names:
        runs = expand(load_experiment(EXPERIMENTS_DIR / f"{name}.yaml"), "/nonexistent/runs")
        counts[name] = {s: sum(r.stage == s for r in runs) for s in dict.fromkeys(r.stage for r in runs)}
    assert counts["model_scaling"]["mae"] == 4 and counts["model_scaling"]["wsp"] == 8 and counts["model_scaling"]["finetune"] == 8
    assert counts["data_scaling"]["mae"] == 5
    assert counts["mae_length"]["mae"] == 3 and counts["mae_length"]["wsp"] == 4
    assert counts["splitmask_vs_mae"]["pretrain"] == 6
    demo = {r.id: r for r in expand(load_experiment(EXPERIMENTS_DIR / "demo.yaml"), "/nonexistent/runs")}
    assert demo["wsp/from_mae,seed=1"].params["init_checkpoint"].endswith("demo/mae/seed=1/model.pt")
    assert "init_checkpoint" not in demo["wsp/scratch,seed=1"].params
    assert {k for k in demo if k.split("/")[0] in ("knn", "linear_probe", "lowshot", "zeroshot")} == {   # 3 pretraining seeds an arm
        f"{s}/seed={seed},init={i}" for s in ("knn", "linear_probe", "lowshot", "zeroshot") for seed in (0, 1, 2) for i in ("scratch", "mae")}
    assert {k for k in demo if k.startswith("finetune")} == {                  # finetune too: every WSP trunk
        f"finetune/seed={seed},init={i}" for seed in (0, 1, 2) for i in ("scratch", "mae")}
    assert all(demo[f"finetune/seed={s},init=scratch"].params["seed"] == s for s in (0, 1, 2))
    assert all(demo[f"zeroshot/seed={s},init=mae"].params["seed"] == s for s in (0, 1, 2))
    for seed in (0, 1, 2):                           # the MAE-only and random-init arms, on k-NN
        assert demo[f"knn_mae/seed={seed}"].params["init_checkpoint"].endswith(f"demo/mae/seed={seed}/model.pt")
        assert "init_checkpoint" not in demo[f"knn_random/seed={seed}"].params
        assert demo[f"knn_random/seed={seed}"].params["seed"] == seed
    assert {k.split("/")[0] for k in demo if "shape_count" in k.split("/")[0]} == {   # the main judge: every arm on shape-count
        "shape_count_train", "shape_count_test", *(f"{e}_shape_count{a}" for e in ("knn", "linear_probe") for a in ("", "_mae", "_random"))}
    assert "init_checkpoint" not in demo["linear_probe_shape_count_random/seed=2"].params
    assert len(demo["report/main"].deps) == 36 + 2 * (6 + 3 + 3)      # digits' 36, then shape-count's k-NN and probe, four arms each


def test_demo_dry_run_prints_the_dag(tmp_path, capsys):
    assert main(["demo", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wsp/from_mae,seed=2" in out and "mae/seed=0" in out and "report/main" in out
    assert not (tmp_path / "demo").exists()


TINY = ["seed=[0]", "steps=3", "shapes.num_samples=64", "batch_size=8", "lowshot.shots=[1]",
        "lowshot.splits=1", "overrides=[data.num_workers=0, eval.num_workers=0, train.log_every=1]"]


def first_judge(spec: dict) -> dict:
    """The demo's experiment with the judge of its first evaluation only: a second judge runs the same stage notebooks on
    other shards, so the tests that execute the DAG leave it (and the shards only it reads) out."""
    stages = spec["stages"]
    judge = stages["knn"]["inputs"]["eval_dataset"].split("/")[0]
    for name in [n for n, st in stages.items() if st.get("inputs", {}).get("eval_dataset", judge).split("/")[0] != judge]:
        stages.pop(name)
    read = {v.split("/")[0] for st in stages.values() for v in st.get("inputs", {}).values() if isinstance(v, str)}
    for name in [n for n, st in stages.items() if st["notebook"] == "shards" and n not in read]: stages.pop(name)
    for st in stages.values():
        if "after" in st: st["after"] = [a for a in st["after"] if a in stages]
    return spec


def test_the_tests_first_judge_keeps_every_notebook_of_the_demo():
    spec = yaml.safe_load((EXPERIMENTS_DIR / "demo.yaml").read_text())
    kept = first_judge(yaml.safe_load((EXPERIMENTS_DIR / "demo.yaml").read_text()))["stages"]
    assert {st["notebook"] for st in kept.values()} == {st["notebook"] for st in spec["stages"].values()}
    assert len(kept) < len(spec["stages"])                  # a second judge was there, and is left out


@pytest.mark.slow
def test_every_stage_notebook_executes_with_tiny_parameters(tmp_path):
    """The demo's DAG on tiny settings, on its first judge (every stage notebook but splitmask), two runs at a time as
    `make demo`; then splitmask alone."""
    path = write_yaml(tmp_path / "demo.yaml", first_judge(yaml.safe_load((EXPERIMENTS_DIR / "demo.yaml").read_text())))
    outcomes = run_experiment(path, out=tmp_path, overrides=TINY, progress=False, jobs=2)
    states = {o.run.id: (o.state, o.note) for o in outcomes}
    assert all(s == "complete" for s, _ in states.values()), states
    root = tmp_path / "demo"
    for kind in ("knn", "linear_probe", "lowshot", "finetune", "zeroshot"):
        for init in ("scratch", "mae"):
            results = json.loads((root / kind / f"seed=0,init={init}" / "results.json").read_text())
            assert results["kind"] == kind and results["records"], (kind, init)
    for arm in ("knn_mae", "knn_random"):
        results = json.loads((root / arm / "seed=0" / "results.json").read_text())
        assert results["kind"] == "knn" and results["records"], arm
    status = json.loads((root / "wsp/from_mae,seed=0/status.json").read_text())
    assert {k: status[k] for k in ("state", "step", "message")} == {"state": "complete", "step": 3, "message": ""}
    sm = tmp_path / "splitmask"
    path = write_yaml(tmp_path / "sm.yaml", {"name": "sm", "stages": {"splitmask": {"notebook": "splitmask", "params": {"steps": 2, "batch_size": 8}}}})
    assert [o.state for o in run_experiment(path, out=sm, progress=False)] == ["complete"]


@pytest.mark.slow
def test_a_reduced_demo_gives_the_same_results_table_twice(tmp_path):
    """Same seed -> same numbers: the demo's DAG up to the frozen-trunk evaluations, twice, gives identical tables:
    once one run at a time in this process and once two at a time, each on one thread (as `make demo`)."""
    from prepretrain_lit.report_table import gather
    spec = first_judge(yaml.safe_load((EXPERIMENTS_DIR / "demo.yaml").read_text()))
    for stage in ("finetune", "zeroshot", "lowshot", "report"): spec["stages"].pop(stage)
    path = write_yaml(tmp_path / "demo_reduced.yaml", spec)
    tables = []
    for name, jobs in (("a", 1), ("b", 2)):
        with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):    # the serial run's kernels on one thread too
            outcomes = run_experiment(path, out=tmp_path / name, progress=False, jobs=jobs,
                                      overrides=[o for o in TINY if not o.startswith("lowshot.")] + ["seed=[0, 1]"])
        assert all(o.state == "complete" for o in outcomes), [(o.run.id, o.state, o.note) for o in outcomes]
        t = gather(tmp_path / name / "demo")
        t = t[(t.record == "eval") | (t.metric == "loss")]                   # not wall-clock rates like images_per_s
        tables.append(t.drop(columns=["source"]).sort_values(["run", "record", "metric", "step", "shots", "split_seed"])
                      .reset_index(drop=True))
    evals = tables[0][tables[0].record == "eval"]
    assert set(evals.kind) == {"knn", "linear_probe"} and evals.seed.nunique() == 2
    pd.testing.assert_frame_equal(tables[0], tables[1])


# -- every stage run checked before any runs -------------------------------------------------------

def demo_with(tmp_path: Path, change) -> Path:
    "experiments/demo.yaml with one mistake made by `change(spec)`, written to tmp_path."
    spec = yaml.safe_load((EXPERIMENTS_DIR / "demo.yaml").read_text())
    change(spec)
    return write_yaml(tmp_path / "demo_bad.yaml", spec)


MISTAKES = {   # what a user writes -> what the error must name
    "preset": (lambda s: s["defaults"].update(preset="tinny"), ["preset='tinny'", "set by defaults", "did you mean 'tiny'", "mae (3 runs)"]),
    "negative steps": (lambda s: s["stages"]["mae"]["params"].update(steps=-5), ["steps=-5", "stages.mae.params", "train.steps=-5 must be > 0"]),
    "steps as a word": (lambda s: s["stages"]["mae"]["params"].update(steps="five"), ["steps='five'", "expects int"]),
    "override key": (lambda s: s["stages"]["mae"]["params"].update(overrides=["optim.base_lrr=1e-3"]),
                     ["overrides=['optim.base_lrr=1e-3']", "did you mean 'optim.base_lr'"]),
    "input file": (lambda s: s["stages"]["mae"]["inputs"].update(dataset="shapes/shapez.yaml"),
                   ["inputs.dataset", "stage 'shapes' (shards) writes shapes.yaml, not 'shapez.yaml'"]),
    "manifest": (lambda s: s["stages"]["shapes"]["params"].update(manifest="shapez"),
                 ["manifest='shapez'", "stages.shapes.params", "did you mean 'shapes'"]),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_dry_run_rejects_each_mistake_naming_the_key(tmp_path, capsys, name):
    change, expected = MISTAKES[name]
    path = demo_with(tmp_path, change)
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "found before anything ran" in err and "Traceback" not in err
    for text in expected: assert text in err, (text, err)


def test_a_template_manifest_asks_for_the_shard_paths(tmp_path, capsys):
    assert main(["run", str(EXPERIMENTS_DIR / "mae_length.yaml"), "--dry-run", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "manifest='ig-hashtags'" in err and "is a template: fill in your shard paths" in err and "CHANGE-ME" in err
    assert "imagenet-1k-val" in err and "Traceback" not in err


def test_every_problem_is_listed_and_the_real_run_checks_first(tmp_path):
    def two(spec):
        spec["defaults"]["preset"] = "tinny"
        spec["stages"]["wsp"]["params"]["steps"] = "five"
        spec["stages"]["finetune"]["params"]["overrides"].append("head.mixupp=0")
    path = demo_with(tmp_path, two)
    with pytest.raises(UserError) as e:
        run_experiment(path, out=tmp_path / "runs", echo=lambda s: None)     # not a dry run: nothing may start
    msg = str(e.value)
    assert "3 problem(s)" in msg and "preset='tinny'" in msg and "steps='five'" in msg and "head.mixupp" in msg, msg
    assert not (tmp_path / "runs").exists()                                # the shards were not built first


def test_a_list_for_a_parameter_that_is_no_grid_axis_is_refused(tmp_path, capsys):
    spec = {"name": "one", "stages": {"mae": {"notebook": "mae", "params": {"steps": 2}}}}
    path = write_yaml(tmp_path / "one.yaml", spec)
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path), "--set", "seed=[0]"]) == 2
    err = capsys.readouterr().err
    assert "seed=[0] (set by --set seed): expects int" in err and "grid axis" in err
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path), "--set", "seed=0"]) == 0


def test_dry_run_finds_missing_shards_and_unset_datasets(tmp_path, shapes_manifest, capsys):
    m = yaml.safe_load(Path(shapes_manifest).read_text())
    m["shards"] = [str(tmp_path / "gone-000000.tar")]
    broken = write_yaml(tmp_path / "broken.yaml", m)
    spec = {"name": "x", "stages": {"mae": {"notebook": "mae", "params": {"steps": 2, "dataset": str(broken)}},
                                    "knn": {"notebook": "knn", "params": {"dataset": str(shapes_manifest)}}}}
    assert main(["run", str(write_yaml(tmp_path / "x.yaml", spec)), "--dry-run", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "1 shard file(s) missing" in err and "gone-000000.tar" in err
    assert "eval_dataset=None" in err and "is not set" in err


def test_papermill_refuses_a_misspelt_parameter(tmp_path):
    import papermill
    from prepretrain_lit.pipeline_exec import venv_kernel
    with venv_kernel(), pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter 'stepz' \(did you mean 'steps'\?\)"):
        papermill.execute_notebook(str(STAGES_DIR / "mae.ipynb"), str(tmp_path / "out.ipynb"), progress_bar=False,
                                   parameters={"stepz": 3, "out_dir": str(tmp_path / "run")}, kernel_name="python3")
    assert not (tmp_path / "run").exists()                                   # stopped before the trainer made its folder


def test_stage_parameters_are_typed_for_papermill_help():
    import subprocess
    import sys
    res = subprocess.run([str(Path(sys.executable).parent / "papermill"), "--help-notebook", str(STAGES_DIR / "mae.ipynb")],
                         capture_output=True, text=True, timeout=120)
    assert "steps: int (default 20)" in res.stdout and "optimizer steps" in res.stdout, res.stdout
    assert "Unknown type" not in res.stdout
    for kind in sorted(p.stem for p in STAGES_DIR.glob("*.ipynb")):
        params = notebook_parameters(STAGES_DIR / f"{kind}.ipynb")
        assert all(p.type for p in params.values()), (kind, [p.name for p in params.values() if not p.type])


# -- --extend: lengthening finished runs ------------------------------------------------------------------------

@pytest.fixture
def env_stages(tmp_path) -> Path:
    "A `train` that records its steps and whether the kernel was told to extend, and leaves a file from its first run."
    d = tmp_path / "stages"
    write_stage_notebook(d / "train.ipynb", OUT + "seed = 0  # seed\nmodel = 'b'  # size\nsteps = 10  # steps", [
        "import os, pathlib\nout = pathlib.Path(out_dir)\n"
        "(out / 'first.txt').exists() or (out / 'first.txt').write_text(str(steps))\n"
        "(out / 'model.pt').write_text(f\"{model} {steps} extend={os.environ.get('PREPRETRAIN_EXTEND')}\")"])
    write_stage_notebook(d / "evaluate.ipynb", OUT + "checkpoint = None  # a model.pt",
                         ["import pathlib; pathlib.Path(out_dir, 'results.json').write_text(pathlib.Path(checkpoint).read_text())"])
    write_stage_notebook(d / "report.ipynb", OUT + "runs = None  # the experiment folder",
                         ["import pathlib; pathlib.Path(out_dir, 'summary.md').write_text('ok')"])
    return d


def test_extend_lengthens_in_place_and_reruns_what_reads_it(env_stages, tmp_path):
    data = experiment(grid={"model": ["b"], "seed": [0]})
    path = write_yaml(tmp_path / "toy.yaml", data)
    runs = tmp_path / "runs"
    assert {o.state for o in run_experiment(path, out=runs, stages_dir=env_stages, progress=False)} == {"complete"}
    (runs / "toy/eval/model=b,seed=0/old.txt").write_text("from the first run")
    data["defaults"]["steps"] = 12
    write_yaml(path, data)
    with pytest.raises(UserError, match=r"(?s)pass --extend.*extend +train/model=b,seed=0: steps 5 -> 12"):
        run_experiment(path, out=runs, stages_dir=env_stages, progress=False)
    lines = []
    run_experiment(path, out=runs, stages_dir=env_stages, dry_run=True, extend=True, echo=lines.append)
    assert "  re-run  eval/model=b,seed=0: its input train/model=b,seed=0 changes" in "\n".join(lines)
    outcomes = run_experiment(path, out=runs, stages_dir=env_stages, progress=False, extend=True)
    assert {o.run.id: o.state for o in outcomes} == {"train/model=b,seed=0": "complete", "eval/model=b,seed=0": "complete",
                                                     "report/main": "complete"}
    train = runs / "toy/train/model=b,seed=0"
    assert (train / "first.txt").read_text() == "5"                      # the folder was kept: resumed, not restarted
    assert (train / "model.pt").read_text() == "b 12 extend=1"          # the kernel was told to extend
    assert stage_json(train)["extended"] == {"steps": [5, 12]}
    assert not (runs / "toy/eval/model=b,seed=0/old.txt").exists()        # the dependant ran anew on the new input
    assert (runs / "toy/eval/model=b,seed=0/results.json").read_text() == "b 12 extend=1"
    again = run_experiment(path, out=runs, stages_dir=env_stages, progress=False, extend=True)
    assert {o.state for o in again} == {"skipped"}


def test_extend_refuses_other_changes_naming_them(env_stages, tmp_path):
    data = experiment(grid={"model": ["b"], "seed": [0]})
    path = write_yaml(tmp_path / "toy.yaml", data)
    run_experiment(path, out=tmp_path / "runs", stages_dir=env_stages, progress=False)
    data["stages"]["train"]["params"]["model"] = "l"     # a change of what the run is, not of its length
    data["defaults"]["steps"] = 3                        # and a shorter run
    write_yaml(path, data)
    with pytest.raises(UserError, match=r"refuse  train/model=b,seed=0: model 'b' -> 'l', steps 5 -> 3") as e:
        run_experiment(path, out=tmp_path / "runs", stages_dir=env_stages, progress=False, extend=True)
    assert "pass --extend" not in str(e.value)


@pytest.mark.slow
def test_extend_resumes_a_real_training_stage(tmp_path):
    "An MAE stage of 4 steps lengthened to 8: the trainer resumes at step 4 and records the extension."
    spec = {"name": "ext", "defaults": {"preset": "tiny"}, "stages": {"mae": {"notebook": "mae", "params": {"steps": 4, "batch_size": 8}}}}
    path = write_yaml(tmp_path / "ext.yaml", spec)
    assert [o.state for o in run_experiment(path, out=tmp_path, progress=False)] == ["complete"]
    spec["stages"]["mae"]["params"]["steps"] = 8
    write_yaml(path, spec)
    assert [o.state for o in run_experiment(path, out=tmp_path, progress=False, extend=True)] == ["complete"]
    folder = tmp_path / "ext/mae/main"
    assert json.loads((folder / "status.json").read_text())["step"] == 8
    [record] = json.loads((folder / "extensions.json").read_text())
    assert (record["from_steps"], record["to_steps"], record["from_step"]) == (4, 8, 4)
    assert "resumed from step 4 of 8" in (folder / "executed.ipynb").read_text()


# -- runs side by side (`run_local(jobs=N)`, `--jobs`) ------------------------------------------------------------

RUNNER = """
import sys
from prepretrain_lit.pipeline_exec import run_local
from prepretrain_lit.pipeline_spec import expand, parse_experiment
from prepretrain_lit.pipeline_stage import write_stage_notebook
root, stages = sys.argv[1], sys.argv[1] + "/stages"
write_stage_notebook(stages + "/nap.ipynb", 'out_dir = "."\\nseed = 0', ["import time; time.sleep(120)"])
exp = parse_experiment({"name": "naps", "grid": {"seed": [0, 1, 2]},
                        "stages": {"nap": {"notebook": "nap", "over": ["seed"], "params": {"seed": "{seed}"}}}}, stages_dir=stages)
run_local(expand(exp, root + "/runs"), progress=False, jobs=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_to_the_runner_stops_the_runs_in_flight_and_records_them_interrupted(tmp_path, name):
    """Ctrl-C or SIGTERM to the runner alone (not its process group): both runs it has in flight are stopped and record
    'interrupted' (not orphaned, still running), and the third never starts."""
    import signal
    import subprocess
    import sys
    import time
    # Ctrl-C: a runner in a terminal (SIGINT at its default, wherever this test runs). SIGTERM: a runner in a background
    # job, which ignores SIGINT, and so would the runs' processes it starts, were it not for `_worker`.
    sigint = signal.SIG_DFL if name == "SIGINT" else signal.SIG_IGN
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path)], start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    folders = [tmp_path / f"runs/naps/nap/seed={s}" for s in range(3)]
    def state(folder: Path) -> str | None:
        try: return json.loads((folder / "stage.json").read_text()).get("state")
        except (OSError, ValueError): return None
    deadline = time.monotonic() + 120
    while not all(state(f) == "running" and (f / "executed.ipynb").exists() for f in folders[:2]):
        assert runner.poll() is None and time.monotonic() < deadline, "the two runs did not start"
        time.sleep(0.5)
    time.sleep(3)                                   # the kernels are in `time.sleep(120)`
    runner.send_signal(getattr(signal, name))
    try: runner.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(runner.pid, signal.SIGKILL)
        raise AssertionError(f"the runner did not stop within 60 s of {name}")
    assert runner.returncode != 0
    assert [state(f) for f in folders] == ["interrupted", "interrupted", None]


def test_the_runner_and_the_cli_do_not_load_torch(tmp_path):
    """The runner's process (and each side-by-side run's) only starts kernels: importing torch and timm there would
    cost every run seconds (about 3 s of CPU each on these machines), which is what the demo's budget cannot pay."""
    import subprocess
    import sys
    code = RUNNER.replace("time.sleep(120)", "x = 1").replace("[0, 1, 2]", "[0]").replace("jobs=2", "jobs=1") + (
        "import prepretrain_lit.cli\n"
        "loaded = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
        "assert not loaded, f'the runner imported {loaded}'\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "runs/naps/nap/seed=0/stage.json").read_text())["state"] == "complete"


@pytest.mark.slow
def test_sigterm_to_the_process_group_leaves_runs_in_flight_interrupted_and_a_rerun_finishes_them(tmp_path):
    """SIGTERM to the whole process group (a job's end): the runner, its runs' processes and their kernels all go;
    the two runs that were in flight read `interrupted` (not a stale `running`), and the next invocation runs all three."""
    import signal
    import subprocess
    import sys
    import time
    from prepretrain_lit.pipeline_plan import live_state
    from prepretrain_lit.run_folder import read_stage
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path)], start_new_session=True)
    folders = [tmp_path / f"runs/naps/nap/seed={s}" for s in range(3)]
    deadline = time.monotonic() + 120
    while not all((read_stage(f) or {}).get("state") == "running" and (f / "executed.ipynb").exists()
                  for f in folders[:2]):
        assert runner.poll() is None and time.monotonic() < deadline, "the two runs did not start"
        time.sleep(0.5)
    os.killpg(runner.pid, signal.SIGTERM)
    runner.wait(timeout=60)
    deadline = time.monotonic() + 30                # the kernels, in the same group, end as well
    while [live_state(f, read_stage(f)) for f in folders[:2]] != ["interrupted"] * 2:
        assert time.monotonic() < deadline, [read_stage(f) for f in folders[:2]]
        time.sleep(0.5)
    assert not (folders[2] / "stage.json").exists()
    again = subprocess.run([sys.executable, "-c", RUNNER.replace("time.sleep(120)", "x = 1"), str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [read_stage(f)["state"] for f in folders] == ["complete"] * 3


def test_a_run_the_trainer_refuses_leaves_its_stage_json_as_it_was(tmp_path):
    """The trainer refuses a resume or an extension before writing anything (`RunRefused`); the runner had already
    marked the run `running` (and `extended`): it puts stage.json back, byte for byte, and says why in one line."""
    stages = tmp_path / "stages"
    write_stage_notebook(stages / "train.ipynb", OUT + "steps = 10  # steps", [
        "import os, pathlib\nfrom prepretrain_lit.schema import RunRefused\n"
        "if os.environ.get('PREPRETRAIN_EXTEND') == '1': raise RunRefused('checkpoint step 5 was written over other data')\n"
        "pathlib.Path(out_dir, 'model.pt').write_text(str(steps))"])
    data = {"name": "toy", "defaults": {"steps": 5}, "stages": {"train": {"notebook": "train", "params": {}}}}
    path = write_yaml(tmp_path / "toy.yaml", data)
    runs = tmp_path / "runs"
    assert [o.state for o in run_experiment(path, out=runs, stages_dir=stages, progress=False)] == ["complete"]
    record = runs / "toy/train/main/stage.json"
    before = record.read_bytes()
    data["defaults"]["steps"] = 8
    write_yaml(path, data)
    with pytest.raises(UserError, match=r"^train/main: checkpoint step 5 was written over other data$"):
        run_experiment(path, out=runs, stages_dir=stages, progress=False, extend=True)
    assert record.read_bytes() == before
