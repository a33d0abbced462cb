"""The report: run folders -> one tidy table -> figures and an honest summary (nbs/09a_report_table, 09b_report_summary,
09c_report_figures, 09d_report; the example run folders of nbs/09_fixtures); each run's kind and trunk from its own
records (nbs/07b_lineage), in the report and in `prepretrain status`."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from prepretrain_lit.schema import UserError
from prepretrain_lit.presets import load_config, save_config
from prepretrain_lit.mae import mae_from_config
from prepretrain_lit._fixtures import example_runs, write_stage
from prepretrain_lit.report_table import COLUMNS, gather, load_table
from prepretrain_lit.report import build_report
from prepretrain_lit.report_summary import compare_convergence, compare_evals, summarize, with_recipe
from prepretrain_lit.report_figures import (held_out_images, load_stage_mae, make_figures, plot_convergence,
                                            MissingData)

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def runs(tmp_path):
    "A hand-written experiment: a WSP stage (stage.json + metrics with a half line), an evaluation, a stage with "
    "only config.yaml, and a failed stage."
    exp = tmp_path / "demo"
    write(exp / "wsp/scratch/stage.json", json.dumps({
        "experiment": "demo", "stage": "wsp", "variant": "scratch", "kind": "wsp", "state": "complete",
        "axes": {"model": "vit_b16", "subset": "1k", "mae_length": None, "objective": "wsp", "seed": 3, "init": "scratch"}}))
    write(exp / "wsp/scratch/metrics.jsonl",
          '{"step": 10, "loss": 2.5, "lr": 0.001, "images_per_s": 100.0, "note": "text is not a metric"}\n'
          '{"step": 20, "loss": 2.0, "lr": 0.0005, "images_per_s": 120.0, "ok": true}\n'
          '{"step": 30, "loss": 1.')                                              # the writer died mid-line
    write(exp / "linear_probe/from_mae/stage.json", json.dumps({
        "experiment": "demo", "stage": "linear_probe", "variant": "from_mae", "kind": "linear_probe", "state": "complete",
        "axes": {"model": "vit_b16", "subset": "1k", "mae_length": 0.1, "objective": "wsp", "seed": 3, "init": "mae"}}))
    write(exp / "linear_probe/from_mae/results.json", json.dumps({
        "schema_version": 1, "kind": "linear_probe", "dataset": "digits-test", "train_dataset": "digits-train",
        "init": "runs/demo/wsp/from_mae/model.pt", "config_hash": "0123abcd4567",
        "records": [{"metric": "top1", "value": 93.1, "seed": 3, "shots": None, "step": 200},
                    {"metric": "top5", "value": 99.8, "seed": 3, "shots": None, "step": 200}],
        "summary": {"top1": {"mean": 93.1, "std": 0.0, "n": 1}}}))
    # no stage.json: names from the folders, axes from config.yaml
    cfg = load_config(preset="tiny", overrides=["data.subset=5k", "seed=7"])
    save_config(cfg, write(exp / "mae/manual/config.yaml", "").parent / "config.yaml")
    write(exp / "mae/manual/metrics.jsonl", '{"step": 5, "loss": 0.9}\n')
    write(exp / "wsp/diverged/stage.json", json.dumps({
        "experiment": "demo", "stage": "wsp", "variant": "diverged", "kind": "wsp", "state": "failed",
        "error": "Traceback...\nTrainingDiverged: loss is nan", "axes": {"objective": "wsp"}}))
    write(exp / "wsp/diverged/metrics.jsonl", '{"step": 10, "loss": NaN}\n')
    write(exp / "wsp/scratch/checkpoints/step_20/config.yaml", "seed: 0\n")      # inside checkpoints: not a stage
    return exp


def test_gather_exact_rows(runs):
    table = gather(runs)
    assert list(table.columns) == COLUMNS
    curves = table[table.run == "demo/wsp/scratch"]
    got = sorted((int(r.step), r.metric, r.value) for r in curves.itertuples())
    assert got == [(10, "images_per_s", 100.0), (10, "loss", 2.5), (10, "lr", 0.001),
                   (20, "images_per_s", 120.0), (20, "loss", 2.0), (20, "lr", 0.0005)]
    row = curves.iloc[0]
    assert (row.experiment, row.stage, row.variant, row.kind, row.model, row.subset, row.objective, row.init, row.seed,
            row.record, row.state) == ("demo", "wsp", "scratch", "wsp", "vit_b16", "1k", "wsp", "scratch", 3, "curve", "complete")
    assert row.params == 85_798_656 and pd.isna(row.mae_length) and pd.isna(row.shots)
    assert row.source == str(runs / "wsp/scratch/metrics.jsonl")

    evals = table[table.record == "eval"]
    assert sorted(zip(evals.metric, evals.value)) == [("top1", 93.1), ("top5", 99.8)]
    e = evals.iloc[0]
    assert (e.kind, e.dataset, e.init, e.mae_length, e.seed, e.step, e.model) == \
        ("linear_probe", "digits-test", "mae", 0.1, 3, 200, "vit_b16")
    assert pd.isna(e.shots) and pd.isna(e.split_seed)

    manual = table[table.variant == "manual"]
    assert len(manual) == 1
    m = manual.iloc[0]
    assert (m.experiment, m.stage, m.kind, m.model, m.subset, m.seed, m.objective, m.init, m.value, m.step) == \
        ("demo", "mae", "mae", "vit_tiny_cpu", "5k", 7, "mae", "scratch", 0.9, 5)


def test_broken_line_and_failed_stage_are_noted_not_fatal(runs):
    table = gather(runs)
    assert not (table.variant == "diverged").any()
    notes = table.attrs["notes"]
    assert any("metrics.jsonl" in n and "1 line(s) skipped" in n and "line 3" in n for n in notes)
    assert any("diverged" in n and "failed" in n and "TrainingDiverged: loss is nan" in n for n in notes)
    assert table.attrs["stages"] == 4                 # scratch, from_mae, manual, diverged (checkpoints/ not entered)


def test_several_roots_and_missing_root(runs, tmp_path):
    other = example_runs(tmp_path / "elsewhere", mae_model=False)
    both = gather([runs, other])
    assert set(both.experiment) == {"demo", "example"}
    assert len(both) == len(gather(runs)) + len(gather(other))
    assert len(gather([runs, runs / "wsp"])) == len(gather(runs))          # overlapping roots: each stage once
    with pytest.raises(UserError, match="run folder not found"):
        gather(tmp_path / "nope")


def test_lowshot_records_keep_shots_and_split_seeds(tmp_path):
    write_stage(tmp_path / "e/lowshot/a", dict(experiment="e", stage="lowshot", variant="a", kind="lowshot",
                                               axes=dict(objective="wsp", init="mae", seed=1)),
                results=dict(kind="lowshot", dataset="d", records=[
                    {"metric": "top1", "value": 10.0 + k + s, "seed": s, "shots": k, "step": None}
                    for k in (1, 5) for s in (0, 1)]))
    t = gather(tmp_path / "e")
    assert sorted(zip(t.shots, t.split_seed, t.value)) == [(1, 0, 11.0), (1, 1, 12.0), (5, 0, 15.0), (5, 1, 16.0)]
    assert set(t.seed) == {1}                         # the run's seed; the split's is split_seed


def test_summary_numbers_equal_the_table(tmp_path):
    table = gather(example_runs(tmp_path, mae_model=False))
    comparisons = compare_evals(table)
    assert len(comparisons) > 0
    lines = summarize(table)
    recipes = with_recipe(table).recipe
    assert {"MAE→WSP", "MAE(0.1 ep)→WSP", "MAE(0.5 ep)→WSP"} <= set(comparisons.treatment)
    for c in comparisons[comparisons.against.eq("scratch")].itertuples():
        same = ((table.record == "eval") & (table.kind == c.kind) & (table.metric == c.metric) & (table.objective == c.objective)
                & (table.model == c.model) & (table.subset.isna() if pd.isna(c.subset) else table.subset.eq(c.subset))
                & (table.shots.isna() if c.shots is None or pd.isna(c.shots) else table.shots.eq(c.shots)).fillna(False))
        treated = table[same & (recipes == c.treatment)].value
        base = table[same & (recipes == "WSP")].value
        assert (c.mean, c.n, c.base_mean, c.base_n) == (treated.mean(), len(treated), base.mean(), len(base))
        if len(treated) > 1: assert math.isclose(c.std, treated.std()) and math.isclose(c.base_std, base.std())
        assert math.isclose(c.diff, treated.mean() - base.mean())
        assert f"{treated.mean():.1f}" in c.text and f"{base.mean():.1f}" in c.text and f"(n={len(treated)}" in c.text
        assert c.text in lines
    for c in comparisons[comparisons.against.eq("smallest subset")].itertuples():   # the fixture's WSP arms on 1k and 5k
        recipe, larger = c.treatment.rsplit(" on ", 1)
        same = ((table.record == "eval") & (table.kind == c.kind) & (table.metric == c.metric) & (recipes == recipe)
                & (table.model == c.model) & (table.objective == c.objective)
                & (table.shots.isna() if c.shots is None or pd.isna(c.shots) else table.shots.eq(c.shots)).fillna(False))
        assert (c.subset, c.baseline) == (larger, f"{recipe} on 1k")
        assert (c.mean, c.base_mean) == (table[same & table.subset.eq(larger)].value.mean(), table[same & table.subset.eq("1k")].value.mean())
        assert c.text in lines
    assert set(comparisons.against) == {"scratch", "smallest subset"}   # no random-init trunk in the fixture
    probe = comparisons[(comparisons.kind == "linear_probe") & comparisons.subset.isna() & (comparisons.treatment == "MAE→WSP")].iloc[0]
    rows = table[(table.stage == "linear_probe") & (table.metric == "top1")]
    mae = rows[(rows.init == "mae") & (rows.mae_length == 1.0)].value
    scratch = rows[rows.init == "scratch"].value
    assert (f"MAE→WSP {mae.mean():.1f} ± {mae.std():.1f} (n=3) vs WSP {scratch.mean():.1f} ± {scratch.std():.1f} (n=3)"
            in probe.text)


def _probe_runs(root: Path, mae: list[float], scratch: list[float]) -> Path:
    for init, values in (("mae", mae), ("scratch", scratch)):
        for seed, value in enumerate(values):
            write_stage(root / "x/probe" / f"{init}{seed}", dict(experiment="x", stage="probe", variant=f"{init}{seed}",
                        kind="linear_probe", axes=dict(model="vit_b16", objective="wsp", init=init, seed=seed)),
                        results=dict(kind="linear_probe", dataset="in1k", records=[{"metric": "top1", "value": value, "seed": seed}]))
    return root / "x"


def test_summary_says_when_mae_does_not_win(tmp_path):
    lines = summarize(gather(_probe_runs(tmp_path / "a", mae=[78.0, 79.0], scratch=[80.0, 82.0])))
    assert ("linear probe on in1k (vit_b16), top1: MAE→WSP 78.5 ± 0.7 (n=2) vs WSP 81.0 ± 1.4 (n=2): "
            "MAE→WSP does NOT beat WSP (behind by 2.5)") in lines
    within = summarize(gather(_probe_runs(tmp_path / "b", mae=[80.0, 83.0], scratch=[80.0, 82.0])))
    assert any("MAE→WSP is ahead by 0.5, within the spread over seeds" in line for line in within)
    behind = summarize(gather(_probe_runs(tmp_path / "d", mae=[79.0, 82.0], scratch=[80.0, 82.0])))
    assert any(line.endswith("MAE→WSP does NOT beat WSP (behind by 0.5, within the spread over seeds)") for line in behind)
    clear = summarize(gather(_probe_runs(tmp_path / "c", mae=[90.0, 90.2], scratch=[80.0, 80.4])))
    assert any(line.endswith("MAE→WSP is ahead by 9.9") for line in clear)


def test_convergence_comparison_from_curves(tmp_path):
    for init, losses in (("scratch", [3.0, 2.0, 1.5]), ("mae", [2.0, 1.4, 1.2])):
        write_stage(tmp_path / "c/wsp" / init, dict(experiment="c", stage="wsp", variant=init, kind="wsp",
                                                    axes=dict(objective="wsp", init=init, seed=0)),
                    [{"step": s, "loss": l} for s, l in zip((10, 20, 30), losses)])
    c = compare_convergence(gather(tmp_path / "c")).iloc[0]
    assert (c["mean"], c.base_mean, c.step_reached) == (1.2, 1.5, 20)
    assert "MAE→WSP is lower by 0.300" in c.text and "reached WSP's final loss (1.500, step 30) at step 20" in c.text


def test_every_figure_is_a_png(tmp_path):
    exp = example_runs(tmp_path / "runs", steps=40)
    table = gather(exp)
    made, skipped = make_figures(table, tmp_path / "figs", verbose=False)
    assert skipped == {}
    assert sorted(made) == ["convergence", "lowshot", "mae_length", "reconstructions_example_mae_base", "scaling", "training_curves"]
    for path in made.values():
        data = Path(path).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def test_missing_data_skips_a_figure_with_its_reason(tmp_path):
    table = gather(_probe_runs(tmp_path, mae=[70.0], scratch=[60.0]))
    with pytest.raises(MissingData, match="no WSP training curves"):
        plot_convergence(table)
    made, skipped = make_figures(table, tmp_path / "figs", verbose=False)
    assert set(made) == set()                                   # one model, one subset, no curves, no low-shot, no MAE
    assert set(skipped) == {"convergence", "scaling", "mae_length", "lowshot", "training_curves", "reconstructions"}
    assert "no low-shot records" in skipped["lowshot"] and "no MAE stage with a model.pt" in skipped["reconstructions"]


def test_reconstructions_from_a_real_tiny_mae(tmp_path):
    cfg = load_config(preset="tiny", overrides=["model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
                                                "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16",
                                                "model.decoder_depth=1", "model.decoder_num_heads=2"])
    folder = tmp_path / "t/mae/base"
    torch.manual_seed(0)
    model = mae_from_config(cfg.model, cfg.mae)
    write_stage(folder, dict(experiment="t", stage="mae", variant="base", kind="mae", axes=dict(objective="mae")),
                [{"step": 1, "loss": 1.0}], config=cfg)
    torch.save({"model": model.state_dict()}, folder / "model.pt")
    loaded, loaded_cfg = load_stage_mae(folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    made, skipped = make_figures(gather(tmp_path / "t"), tmp_path / "figs", verbose=False)
    assert "reconstructions_t_mae_base" in made, skipped
    assert Path(made["reconstructions_t_mae_base"]).read_bytes()[:8] == PNG_MAGIC


def test_held_out_images_are_past_the_training_set():
    from PIL import Image
    from prepretrain_lit.render import render_shapes
    from prepretrain_lit.decode import TRANSFORMS
    cfg = load_config(preset="tiny")                       # data.dataset = shapes: 20,000 training images
    imgs, what = held_out_images(cfg, n=2)
    assert imgs.shape == (2, 3, 32, 32) and "20000" in what
    expected = TRANSFORMS["eval"](32)(Image.fromarray(render_shapes(0, 20001, 64)[0]))
    assert torch.equal(imgs[1], expected)
    digits = load_config(preset="tiny", overrides=["data.dataset=digits-train"])
    assert "digits test" in held_out_images(digits, n=1)[1]


def test_build_report_writes_table_figures_summary(runs):
    paths = build_report(runs, verbose=False)
    out = runs / "report"
    assert paths["table"] == out / "results.csv" and paths["parquet"] == out / "results.parquet"
    table = gather(runs)
    for saved in (load_table(paths["table"]), load_table(paths["parquet"])):
        pd.testing.assert_frame_equal(saved, table, check_like=False)
    summary = Path(paths["summary"]).read_text()
    assert "No comparison possible" in summary             # the MAE->WSP probe has no from-scratch counterpart here
    assert "linear probe on digits-test (vit_b16, subset 1k), top1: MAE(0.1 ep)→WSP 93.1 (n=1, no spread)" in summary
    assert "TrainingDiverged" in summary and "figure lowshot not made" in summary
    for png in paths["figures"].values(): assert f"figures/{Path(png).name}" in summary
    assert len(gather(runs)) == len(table)                  # the report folder adds no stage
    with pytest.raises(UserError, match="no stage runs found"):
        build_report(runs / "report" / "figures", verbose=False)


def test_cli_report_command(runs, capsys):
    from prepretrain_lit import cli
    assert cli.main(["report", str(runs), "--out", str(runs.parent / "cli_report")]) == 0
    assert (runs.parent / "cli_report" / "summary.md").is_file() and (runs.parent / "cli_report" / "results.parquet").is_file()
    assert len(load_table(runs.parent / "cli_report" / "results.csv")) == len(gather(runs))


def test_lineage_fills_objective_and_init_from_checkpoints(tmp_path):
    "An experiment whose grid is mae_length sets no init axis, and evaluations name no objective: both come from the "
    "checkpoints, here cluster paths that only exist as <stage>/<variant> in the copied folder."
    exp = tmp_path / "ml"
    cluster = "/cluster/runs/ml"
    for length in (0.1, 0):
        v = f"mae_length={length}"
        axes = dict(model="vit_l16", subset=None, mae_length=length, objective=None, seed=0, init=None)
        if length:
            write_stage(exp / "mae" / v, dict(experiment="ml", stage="mae", variant=v, kind="mae", axes={**axes, "objective": "mae"}),
                        [{"step": 1, "loss": 1.0}], config=load_config(preset="tiny"))
        init = [f"init.checkpoint={cluster}/mae/{v}/model.pt"] if length else []
        write_stage(exp / "wsp" / v, dict(experiment="ml", stage="wsp", variant=v, kind="wsp", axes={**axes, "objective": "wsp"}),
                    [{"step": 1, "loss": 3.0}], config=load_config(preset="tiny", overrides=init))
        write_stage(exp / "finetune" / v, dict(experiment="ml", stage="finetune", variant=v, kind="finetune", axes=axes,
                                               inputs={"init_checkpoint": f"{cluster}/wsp/{v}/model.pt", "dataset": "x.yaml"}),
                    results=dict(kind="finetune", dataset="in1k", records=[{"metric": "top1", "value": 80.0 if length else 78.0}]))
    t = gather(exp)
    origin = t.drop_duplicates("run").set_index("run")[["objective", "init", "mae_length"]]
    assert origin.loc["ml/wsp/mae_length=0.1"].tolist() == ["wsp", "mae", 0.1]
    assert origin.loc["ml/wsp/mae_length=0"].tolist() == ["wsp", "scratch", 0.0]
    assert origin.loc["ml/finetune/mae_length=0.1"].tolist() == ["wsp", "mae", 0.1]
    assert origin.loc["ml/finetune/mae_length=0"].tolist() == ["wsp", "scratch", 0.0]
    assert ("finetune on in1k (vit_l16), top1: MAE(0.1 ep)→WSP 80.0 (n=1, no spread) vs WSP 78.0 (n=1, no spread): "
            "MAE(0.1 ep)→WSP is ahead by 2.0 (n=1, no spread)") in summarize(t)


@pytest.mark.parametrize("mae, scratch, expected", [
    ([90.0, 90.5, 91.0], [80.0, 80.5, 81.0], "holds"),                        # 10 points apart, spread 0.5
    ([70.0, 70.5, 71.0], [80.0, 80.5, 81.0], "does not hold at this scale"),  # the same, the other way
    ([80.0, 84.0, 88.0], [79.0, 83.0, 87.0], "within the spread"),            # 1 point apart, spread 4
    ([90.0, 90.5], [80.0, 80.5], "too few seeds (n < 3): no verdict"),        # a clear gap, but n = 2
])
def test_verdict_on_constructed_tables(tmp_path, mae, scratch, expected):
    "Welch's two-sided t-test at 0.05 with n >= 3 a side: the verdict column and the summary's sentence agree."
    row = compare_evals(gather(_probe_runs(tmp_path, mae=mae, scratch=scratch))).iloc[0]
    assert row.verdict == expected
    if len(mae) >= 3:      # the claim, then the power line: the difference these spreads would have called 'holds'
        assert row.text.endswith(f"the claim 'MAE→WSP beats WSP': {expected} (it would hold from a difference of "
                                 f"{row.holds_from:.1f})")
    else: assert "the claim" not in row.text                                  # the sentence says "one seed" / "spread" already
    assert any(line == row.text for line in summarize(gather(tmp_path / "x")))


def test_convergence_verdict_prefers_the_lower_loss(tmp_path):
    for init, finals in (("scratch", [2.0, 2.1, 2.2]), ("mae", [1.0, 1.1, 1.2])):
        for seed, final in enumerate(finals):
            write_stage(tmp_path / "c/wsp" / f"{init}{seed}", dict(experiment="c", stage="wsp", variant=f"{init}{seed}",
                        kind="wsp", axes=dict(objective="wsp", init=init, seed=seed)),
                        [{"step": s, "loss": l} for s, l in zip((10, 20), (3.0, final))])
    c = compare_convergence(gather(tmp_path / "c")).iloc[0]
    assert c.verdict == "holds" and "the claim 'MAE→WSP trains to a lower loss than WSP': holds" in c.text


# -- at cluster size: the columnar gather, thinning, dead stages ------------------------------------------------------

def test_columnar_table_equals_the_plain_one(runs, tmp_path):
    "The columnar gather (arrays per run, pyarrow's JSON reader where it can) builds the same table, notes included, as "
    "the plain one (a DataFrame per folder): read whole, thinned, with a damaged file, and with two runs of one name."
    example_runs(tmp_path / "ex", mae_model=False)
    write(tmp_path / "ex/example/wsp/odd/metrics.jsonl",        # mixed types, a bool, a null, NaN, unsorted steps
          '{"step": 20, "loss": 1, "ok": true, "gpu": "a"}\n{"step": 10, "loss": 2.5, "ok": 1, "x": null}\n'
          '{"step": 30, "loss": NaN, "lr": 0.1}\n{"step": 30, "loss": 0.5, "lr": "n/a"}\n')
    write(tmp_path / "twin/example/wsp/scratch_s0/metrics.jsonl", '{"step": 10, "loss": 9.0}\n{"step": 15, "loss": 8.0}\n')
    for roots in (runs, tmp_path / "ex", [tmp_path / "ex", tmp_path / "twin"]):   # twin: a second example/wsp/scratch_s0
        for max_points in (None, 6):
            columnar, plain = gather(roots, max_points=max_points), gather(roots, max_points=max_points, columnar=False)
            pd.testing.assert_frame_equal(columnar, plain)
            assert columnar.attrs["notes"] == plain.attrs["notes"]
    odd = gather(tmp_path / "ex", max_points=None)
    odd = odd[odd.variant == "odd"]
    assert sorted(zip(odd.metric, odd.step, odd.value)) == [("loss", 10, 2.5), ("loss", 20, 1.0), ("loss", 30, 0.5), ("lr", 30, 0.1), ("ok", 10, 1.0)]


def test_thinning_keeps_the_first_last_smallest_and_largest_points(tmp_path):
    loss = [5.0 - 0.01 * s for s in range(200)]
    loss[137], loss[51] = 0.1, 9.0                                   # the best and the worst, off any even grid
    write_stage(tmp_path / "t/wsp/a", dict(experiment="t", stage="wsp", variant="a", kind="wsp", axes={}),
                [{"step": 10 * (s + 1), "loss": l, "lr": 1e-3} for s, l in enumerate(loss)])
    t = gather(tmp_path / "t", max_points=10)
    curve = t[t.metric == "loss"]
    assert len(curve) <= 10 and curve.step.is_monotonic_increasing
    assert {10, 2000, 1380, 520} <= set(curve.step)                  # first, last, min (step 1380), max (step 520)
    assert curve.value.min() == 0.1 and curve.value.max() == 9.0
    assert len(t[t.metric == "lr"]) <= 10
    assert any("thinned to 10" in n for n in t.attrs["notes"])
    full = gather(tmp_path / "t", max_points=None)
    assert len(full[full.metric == "loss"]) == 200 and not any("thinned" in n for n in full.attrs["notes"])


def test_a_run_label_is_one_shared_object_not_a_string_a_row(tmp_path):
    "What keeps 1,000 runs x 2,000 lines in a few GB: a label column holds one reference per row to its run's string."
    write_stage(tmp_path / "m/wsp/a", dict(experiment="m", stage="wsp", variant="a", kind="wsp", axes={}),
                [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 50)])
    t = gather(tmp_path / "m")
    for column in ("source", "run", "experiment", "kind", "record"):
        assert len({id(v) for v in t[column]}) == 1, column


def _dead_pid() -> int:
    import subprocess, sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_dead_and_unfinished_stages_never_enter_a_verdict(tmp_path):
    "A killed, a failed and an interrupted stage (running, its process gone) are left out with a note; a preempted "
    "one stays in the table with its state and out of the comparisons."
    import socket
    exp = _probe_runs(tmp_path, mae=[70.0, 70.5, 71.0], scratch=[80.0, 80.5, 81.0])
    before = compare_evals(gather(exp)).iloc[0]
    assert before.verdict == "does not hold at this scale"
    dead = dict(killed=dict(state="killed", error="DeadKernelError: the kernel died"),
                failed=dict(state="failed", error="RuntimeError: boom"),
                interrupted=dict(state="running", pid=_dead_pid(), host=socket.gethostname()),
                preempted=dict(state="preempted"))
    for i, (name, record) in enumerate(dead.items()):
        write_stage(exp / "probe" / name, dict(experiment="x", stage="probe", variant=name, kind="linear_probe",
                    axes=dict(model="vit_b16", objective="wsp", init="mae", seed=10 + i), **record),
                    results=dict(kind="linear_probe", dataset="in1k", records=[{"metric": "top1", "value": 99.0, "seed": 10 + i}]))
    t = gather(exp)
    assert set(t.variant) == {"mae0", "mae1", "mae2", "scratch0", "scratch1", "scratch2", "preempted"}
    assert t[t.variant == "preempted"].state.tolist() == ["preempted"]
    notes = t.attrs["notes"]
    for name, state in (("killed", "killed"), ("failed", "failed"), ("interrupted", "interrupted")):
        assert any(f"probe/{name}: stage {state}" in n and "left out" in n for n in notes), (name, notes)
    assert any("probe/preempted: stage preempted" in n and "not compared" in n for n in notes)
    after = compare_evals(t).iloc[0]
    assert (after.n, after["mean"], after.verdict) == (3, before["mean"], before.verdict)
    assert after.text in summarize(t)


def test_save_table_writes_a_csv_when_asked_or_small(tmp_path, monkeypatch):
    from prepretrain_lit import report_table
    table = gather(example_runs(tmp_path, mae_model=False))
    csv, parquet = report_table.save_table(table, tmp_path / "a")
    assert csv == tmp_path / "a/results.csv" and csv.is_file()          # a demo-sized table: both
    monkeypatch.setattr(report_table, "CSV_MAX_ROWS", 10)                # the module save_table reads it from
    csv, parquet = report_table.save_table(table, tmp_path / "b")
    assert csv is None and not (tmp_path / "b/results.csv").exists()    # a big one: parquet only ...
    csv, _ = report_table.save_table(table, tmp_path / "c", csv=True)          # ... unless asked
    pd.testing.assert_frame_equal(load_table(csv), table)
    pd.testing.assert_frame_equal(load_table(parquet), table)


def test_curve_bands_are_the_mean_and_sd_over_runs():
    from prepretrain_lit.report_figures import curve_bands, plot_training_curves
    rng = np.random.default_rng(0)
    steps = np.array([10, 20, 30, 40])
    rows = [dict(run=f"{recipe}/s{seed}", recipe=recipe, step=s, value=v)
            for recipe, offset in (("MAE→WSP", 1.0), ("WSP", 3.0)) for seed in range(3)
            for s, v in zip(steps, offset + rng.normal(size=len(steps)))]
    curves = pd.DataFrame(rows).sample(frac=1, random_state=1)            # row order must not matter
    bands = curve_bands(curves, ["recipe"])
    direct = pd.DataFrame(rows).groupby(["recipe", "step"]).value.agg(["mean", "std", "size"]).reset_index()
    assert bands[["recipe", "step"]].values.tolist() == direct[["recipe", "step"]].values.tolist()
    assert np.allclose(bands["mean"], direct["mean"]) and np.allclose(bands.sd, direct["std"]) and (bands.n == 3).all()
    # a run with other steps is interpolated onto the grid, and counts only inside its own range
    extra = pd.DataFrame(dict(run="WSP/s9", recipe="WSP", step=[15, 25], value=[0.0, 1.0]))
    b = curve_bands(pd.concat([curves, extra]), ["recipe"])
    at20 = b[(b.recipe == "WSP") & (b.step == 20)].iloc[0]
    vals = np.r_[[r["value"] for r in rows if r["recipe"] == "WSP" and r["step"] == 20], 0.5]
    assert at20.n == 4 and np.isclose(at20["mean"], vals.mean()) and np.isclose(at20.sd, vals.std(ddof=1))
    assert b[(b.recipe == "WSP") & (b.step == 10)].iloc[0].n == 3


def test_training_curves_draw_a_band_per_recipe_not_a_line_per_run(tmp_path):
    from prepretrain_lit.report_figures import plot_training_curves
    table = gather(example_runs(tmp_path / "ex", seeds=tuple(range(5)), mae_model=False))
    curves = table[table.record == "curve"]
    stage = curves.groupby("stage").run.nunique().idxmax()
    runs = curves[curves.stage == stage].run.nunique()
    assert runs > 8
    fig = plot_training_curves(table, stages=[stage])
    recipes = with_recipe(curves[curves.stage == stage]).recipe.nunique()
    assert all(len(ax.lines) == recipes and len(ax.collections) == recipes for ax in fig.axes)   # a mean and a band each


# -- lineage from the run's own records: folders named freely, never read for what they hold ----------------

@pytest.fixture(scope="module")
def standalone(tmp_path_factory, shapes_manifest):
    "`prepretrain train` / `evaluate` folders named freely, made from one working directory as a user makes them: MAE "
    "for 2 and for 3 steps, WSP from the first (real runs), and k-NN results of each trunk and of a random one (written "
    "by `evaluate`'s own writers, `init_run_folder`, `write_provenance`, `write_results`, without the feature extraction)."
    import os
    from prepretrain_lit.cli import main
    from prepretrain_lit.config import init_run_folder, write_provenance
    from prepretrain_lit.transfer import write_results
    home, cwd = tmp_path_factory.mktemp("home"), os.getcwd()
    os.chdir(home)                  # init.checkpoint is recorded as typed: relative to this folder
    try:
        common = ["--preset", "tiny", "--set", f"data.dataset={shapes_manifest}", "--set", "data.num_workers=0",
                  "--set", "data.batch_size=8"]
        for name, steps in (("mae25", 2), ("mae100", 3)):
            assert main(["train", "mae", *common, "--set", f"train.steps={steps}", "--out", f"runs/{name}"]) == 0
        assert main(["train", "wsp", *common, "--set", "train.steps=2", "--set", "init.checkpoint=runs/mae25/model.pt",
                     "--out", "runs/wsp_a"]) == 0
        for name, trunk, top1 in (("probe_a", "mae25", 30.0), ("probe_b", "mae100", 36.0), ("probe_wsp", "wsp_a", 33.0),
                                  ("probe_random", None, 29.6)):
            cfg = load_config(preset="tiny", stage="knn", overrides=[f"init.checkpoint=runs/{trunk}/model.pt"] if trunk else [])
            out = Path("runs") / name
            init_run_folder(cfg, out); write_provenance(out, cfg)
            write_results(out, "knn", "digits-test", [{"metric": "top1", "value": top1, "seed": 0}], cfg.init.checkpoint,
                          "digits-train", cfg)
    finally: os.chdir(cwd)
    return home / "runs"

STANDALONE = ("mae25", "mae100", "wsp_a", "probe_a", "probe_b", "probe_random", "probe_wsp")


def test_standalone_runs_name_their_kind_and_trunk_from_their_records(standalone):
    "`prepretrain report runs/mae25 runs/mae100 runs/probe_*`, read from another working directory: each row's kind, "
    "objective, init and trunk are the runs' records', followed back through `init.checkpoint`."
    table = gather([standalone / name for name in STANDALONE])
    runs = table.drop_duplicates("run").set_index("run")
    got = lambda run: [None if pd.isna(v) else v for v in runs.loc[run, ["kind", "objective", "init", "trunk"]]]
    assert got("runs/mae25") == ["mae", "mae", "scratch", "runs/mae25"]
    assert got("runs/mae100") == ["mae", "mae", "scratch", "runs/mae100"]
    assert got("runs/wsp_a") == ["wsp", "wsp", "mae", "runs/wsp_a"]
    assert got("runs/probe_a") == ["knn", "mae", "scratch", "runs/mae25"]
    assert got("runs/probe_b") == ["knn", "mae", "scratch", "runs/mae100"]
    assert got("runs/probe_wsp") == ["knn", "wsp", "mae", "runs/wsp_a"]
    assert got("runs/probe_random") == ["knn", None, "scratch", None]
    assert runs.loc["runs/probe_a", "trunk_id"] == runs.loc["runs/mae25", "trunk_id"] != runs.loc["runs/probe_b", "trunk_id"]
    from prepretrain_lit.report_figures import mae_stage_dirs
    assert mae_stage_dirs(table) == [standalone / "mae100", standalone / "mae25"]        # both MAE runs hold a model.pt


def test_the_report_of_standalone_runs_pools_no_two_trunks(standalone, tmp_path):
    paths = build_report([standalone / name for name in STANDALONE], tmp_path / "report", verbose=False)
    summary = Path(paths["summary"]).read_text()
    where = "k-NN on digits-test (vit_tiny_cpu), top1"
    for line in (f"{where}: MAE [runs/mae25] 30.0 (n=1, no spread)", f"{where}: MAE [runs/mae100] 36.0 (n=1, no spread)",
                 f"{where}: MAE→WSP 33.0 (n=1, no spread)", f"{where}: random init 29.6 (n=1, no spread)",
                 f"{where}: MAE [runs/mae100] 36.0 (n=1, no spread) vs random init 29.6 (n=1, no spread): "
                 "MAE [runs/mae100] is ahead by 6.4 (n=1, no spread)"):
        assert f"- {line}\n" in summary, line
    assert "(n=2" not in summary and "(n=3" not in summary and "n < 3" not in summary      # nothing pooled
    comparisons = summary.split("## Comparisons", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    assert len(comparisons) == 3 and all(c.endswith("n=1, no spread)") for c in comparisons), comparisons   # one wording
    assert {"reconstructions_runs_mae25", "reconstructions_runs_mae100"} <= set(paths["figures"])


def test_status_names_each_runs_kind_and_trunk(standalone):
    from prepretrain_lit.pipeline import format_status, status_rows
    rows = {r["stage"]: r for r in status_rows(standalone)}
    assert {name: (rows[name]["kind"], rows[name]["trunk"]) for name in STANDALONE} == {
        "mae25": ("mae", "MAE"), "mae100": ("mae", "MAE"), "wsp_a": ("wsp", "MAE → WSP"),
        "probe_a": ("knn", "MAE (runs/mae25)"), "probe_b": ("knn", "MAE (runs/mae100)"),
        "probe_wsp": ("knn", "MAE → WSP (runs/wsp_a)"), "probe_random": ("knn", "random init")}
    assert "MAE → WSP (runs/wsp_a)" in format_status(list(rows.values()))


def test_experiment_seeds_pool_but_two_trunk_recipes_never_do(tmp_path):
    "An experiment with two MAE recipes (150 and 300 steps; the runner's axes name neither), three seeds each, and a "
    "k-NN of every trunk (cluster paths, found in the copied folder): each recipe is one mean of its three seeds."
    exp = tmp_path / "x"
    for stage, steps, top1 in (("mae", 150, 40.0), ("mae_long", 300, 50.0)):
        for seed in range(3):
            v, ckpt = f"seed={seed}", f"/cluster/runs/x/{stage}/seed={seed}/model.pt"
            write_stage(exp / stage / v, dict(experiment="x", stage=stage, variant=v, kind="mae", axes=dict(seed=seed)),
                        [{"step": steps, "loss": 1.0}],
                        config=load_config(preset="tiny", stage="mae", overrides=[f"seed={seed}", f"train.steps={steps}"]))
            write_stage(exp / f"knn_{stage}" / v, dict(experiment="x", stage=f"knn_{stage}", variant=v, kind="knn",
                                                       axes=dict(seed=seed), inputs={"init_checkpoint": ckpt}),
                        results=dict(kind="knn", dataset="digits-test", init=ckpt,
                                     records=[{"metric": "top1", "value": top1 + seed, "seed": seed}]))
    lines = summarize(gather(exp))
    assert "k-NN on digits-test, top1: MAE [x/mae/seed=0 +2] 41.0 ± 1.0 (n=3)" in lines, lines
    assert "k-NN on digits-test, top1: MAE [x/mae_long/seed=0 +2] 51.0 ± 1.0 (n=3)" in lines, lines
    assert not any("(n=6)" in line for line in lines)


def test_evaluations_whose_trunks_are_not_here_are_neither_random_nor_pooled(standalone, tmp_path):
    "Two evaluation folders copied away from the runs that trained their trunks: each says its trunk is not found (and "
    "names its checkpoint), neither is a random init, and the two are not one mean."
    import shutil
    for name in ("probe_a", "probe_b"): shutil.copytree(standalone / name, tmp_path / "copied" / name)
    table = gather([tmp_path / "copied" / "probe_a", tmp_path / "copied" / "probe_b"])
    lines = summarize(table)
    assert "k-NN on digits-test (vit_tiny_cpu), top1: trunk not found [runs/mae25/model.pt] 30.0 (n=1, no spread)" in lines
    assert "k-NN on digits-test (vit_tiny_cpu), top1: trunk not found [runs/mae100/model.pt] 36.0 (n=1, no spread)" in lines
    assert not any("random init" in line or "(n=2)" in line for line in lines), lines
    assert sum("runs/mae25/model.pt, is not found here" in note for note in table.attrs["notes"]) == 1


def _knn_with_pixels(root: Path, arm: str, init: str, objective, seeds, values, pixels, lowshot=None):
    "k-NN (and low-shot) runs of one arm, each results.json carrying the raw-pixel arm beside the trunk's records."
    for seed, value in zip(seeds, values):
        axes = {"objective": objective, "init": init, "seed": seed, "model": "tiny"}
        write_stage(root / "knn" / f"{arm}-{seed}", dict(experiment="e", stage="knn", variant=f"{arm}-{seed}", kind="knn", axes=axes),
                    results=dict(kind="knn", dataset="digits-test", records=[{"metric": "top1", "value": value, "seed": seed}],
                                 baselines={"pixels": {"records": [{"metric": "top1", "value": pixels, "seed": None}]}}))
        if lowshot is not None:
            write_stage(root / "lowshot" / f"{arm}-{seed}", dict(experiment="e", stage="lowshot", variant=f"{arm}-{seed}",
                                                                 kind="lowshot", axes=axes),
                        results=dict(kind="lowshot", dataset="digits-test",
                                     records=[{"metric": "top1", "value": lowshot + s, "seed": s, "shots": 5} for s in range(3)],
                                     baselines={"pixels": {"records": [{"metric": "top1", "value": 40.0 + s, "seed": s, "shots": 5}
                                                                       for s in range(3)]}}))


def test_the_pixel_arm_is_read_once_judged_against_and_drawn(tmp_path):
    "results.json's `baselines.pixels`: rows of recipe 'pixels', each number once, every trunk set against it, in the figures."
    root = tmp_path / "e"
    _knn_with_pixels(root, "wsp", "scratch", "wsp", [0, 1, 2], [80.0, 81.0, 82.0], 70.0, lowshot=60.0)
    _knn_with_pixels(root, "random", "scratch", None, [0, 1, 2], [50.0, 52.0, 51.0], 70.0, lowshot=20.0)
    table = gather(root)
    pix = table[table.init.eq("pixels")]
    assert len(pix[pix.kind.eq("knn")]) == 6 and pix.objective.isna().all() and pix.trunk.eq("pixels").all()
    evals = compare_evals(table)
    px = {(r.kind, r.treatment): r for r in evals[evals.against == "pixels"].itertuples()}
    assert set(px) == {("knn", "WSP"), ("knn", "random init"), ("lowshot", "WSP"), ("lowshot", "random init")}
    assert (px["knn", "WSP"].base_mean, px["knn", "WSP"].base_n) == (70.0, 1)        # six copies of one number: one
    assert (px["lowshot", "WSP"].base_mean, px["lowshot", "WSP"].base_n) == (41.0, 3)  # three split seeds
    assert px["knn", "WSP"].verdict == "holds" and "WSP beats pixels by 11.0" in px["knn", "WSP"].text
    assert px["knn", "random init"].verdict == "does not hold at this scale"
    assert "random init is behind pixels by 19.0" in px["knn", "random init"].text
    lines = summarize(table)
    assert any(l.startswith("k-NN on digits-test (tiny), top1: pixels 70.0 (n=1, no spread)") for l in lines), lines
    assert not any("pixels" in l and "MAE" in l for l in lines)
    # the old readers' view is unchanged: the trunk's records alone
    assert table[table.init.ne("pixels") & table.kind.eq("knn")].value.tolist() == [50.0, 52.0, 51.0, 80.0, 81.0, 82.0]
    from prepretrain_lit.report_figures import plot_lowshot
    fig = plot_lowshot(table)
    assert "pixels" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_the_power_line_is_the_smallest_difference_that_holds(tmp_path):
    "Each judged comparison says the difference that would have held: scipy's Welch test agrees at that difference."
    from scipy.stats import ttest_ind_from_stats
    root = tmp_path / "e"
    _knn_with_pixels(root, "wsp", "scratch", "wsp", [0, 1, 2], [80.0, 84.0, 82.0], 70.0)
    _knn_with_pixels(root, "random", "scratch", None, [0, 1, 2], [79.0, 81.0, 86.0], 70.0)
    row = compare_evals(gather(root)).query("against == 'random init'").iloc[0]
    d = row.holds_from
    p = lambda diff: ttest_ind_from_stats(row.base_mean + diff, row["std"], 3, row.base_mean, row.base_std, 3, equal_var=False).pvalue
    assert row.verdict == "within the spread" and p(d * 0.999) > 0.05 > p(d * 1.001)
    assert f"within the spread (it would hold from a difference of {d:.1f})" in row.text
