"""Shipped experiments that are meant to be run on CPU: cpu_study validates (dry-run) and has the shape its
claims need -- three seeds a point, four sub-studies, every transfer judge (nbs/08b_pipeline_spec.ipynb)."""
from collections import Counter

from prepretrain_lit.cli import main
from prepretrain_lit.pipeline_spec import expand, load_experiment
from project import ROOT

EXPERIMENTS = ROOT / "experiments"


def test_cpu_study_dry_run_validates(tmp_path, capsys):
    assert main(["run", str(EXPERIMENTS / "cpu_study.yaml"), "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "report/main" in out and "size_knn/" in out
    assert not any(tmp_path.iterdir())                                        # a dry run writes nothing


def test_cpu_study_has_three_seeds_a_point_and_every_arm():
    runs = expand(load_experiment(EXPERIMENTS / "cpu_study.yaml"), "/nonexistent/runs")
    per_stage = Counter(r.stage for r in runs)
    # A: 3 widths x 3 seeds of MAE; WSP from scratch and from MAE for each; four transfer judges of each WSP trunk
    assert per_stage["size_mae"] == 9 and per_stage["size_wsp"] == 18
    assert all(per_stage[s] == 18 for s in ("size_probe", "size_knn", "size_lowshot", "size_finetune"))
    # B: MAE of 0.1 / 0.5 / 1 epoch (0 is plain WSP), WSP at all four lengths
    assert per_stage["length_mae"] == 9 and per_stage["length_wsp"] == 12
    # C: three nested subsets, D: MAE and SplitMask on the small set, and the random-init arm
    assert per_stage["scaling_mae"] == 9 and per_stage["small_pretrain"] == 6 and per_stage["small_scratch"] == 3
    points = Counter((r.stage, tuple(sorted((k, str(v)) for k, v in r.axes.items() if k != "seed"))) for r in runs
                     if r.stage not in ("shapes", "shapes_big", "digits_train", "digits_test", "report"))
    assert set(points.values()) == {3}                                        # every point has exactly 3 seeds
    wsp = {r.id: r for r in runs if r.stage == "size_wsp"}
    assert wsp["size_wsp/from_mae,seed=2,model=96"].params["init_checkpoint"].endswith("size_mae/seed=2,model=96/model.pt")
    assert "model.embed_dim=96" in wsp["size_wsp/from_mae,seed=2,model=96"].params["overrides"]


def test_the_demos_wsp_recipe_is_a_row_of_the_grid_its_choice_was_made_on():
    "demo.yaml says its WSP recipe was chosen on held-out shapes with tools/wsp_recipe.py: that grid holds it."
    import importlib.util
    spec = importlib.util.spec_from_file_location("wsp_recipe", EXPERIMENTS.parent / "tools" / "wsp_recipe.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    wsp = [r for r in expand(load_experiment(EXPERIMENTS / "demo.yaml"), "/nonexistent/runs") if r.stage == "wsp"]
    recipes = {(r.params["steps"], tuple(sorted(r.params["overrides"]))) for r in wsp}
    assert len(recipes) == 1                                                  # both arms, every seed: one recipe
    (steps, overrides), = recipes
    lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=")[1])
    transform = next(o for o in overrides if o.startswith("data.transform=")).split("=")[1]
    assert (steps, lr, transform) in tool.GRID


def test_the_wsp_recipe_tool_runs_and_judges_on_held_out_shapes(tmp_path):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, str(EXPERIMENTS.parent / "tools" / "wsp_recipe.py"), "--quick",
                          "--work", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith("4 ")]
    assert [r[3] for r in rows] == ["scratch", "mae"]                         # both arms of the one quick recipe
    assert all(0 < float(r[5]) < 10 and 0 <= float(r[6].rstrip("%")) <= 100 for r in rows)
    assert (tmp_path / "shapes-val" / "shapes-val.yaml").is_file()            # the held-out set, seed 1
    assert "seed: 1" in (tmp_path / "shapes-val-recipe.yaml").read_text()
