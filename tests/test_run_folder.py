"""Every reader of a run folder's files survives what a killed writer leaves: a missing file, an empty one, a JSON
record cut mid-write, a metrics.jsonl whose last line is half-written. Each test here fails if its reader were not
tolerant (it would raise, or return the damaged record)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from prepretrain_lit.run_folder import (CONFIG, METRICS, PROVENANCE, RESULTS, STAGE, STATUS, append_metrics,
                                        last_metrics, read_config_values, read_curves, read_metrics, read_provenance,
                                        read_results, read_stage, read_status, truncate_metrics, write_json)

JSON_READERS = [(STAGE, read_stage), (RESULTS, read_results), (PROVENANCE, read_provenance), (STATUS, read_status)]
RECORD = {"state": "complete", "step": 3, "message": "", "kind": "knn"}


@pytest.mark.parametrize("name, reader", JSON_READERS, ids=[n for n, _ in JSON_READERS])
def test_a_json_record_missing_empty_or_cut_reads_as_none(tmp_path, name, reader):
    notes = []
    assert reader(tmp_path, notes) is None and notes == []               # missing: nothing to say
    (tmp_path / name).write_text("")                                      # created, nothing written yet
    assert reader(tmp_path, notes) is None and len(notes) == 1
    (tmp_path / name).write_text(json.dumps(RECORD)[:-9])                 # cut mid-write
    assert reader(tmp_path, notes) is None and len(notes) == 2
    (tmp_path / name).write_text("[1, 2]")                                # JSON, not a record
    assert reader(tmp_path, notes) is None and "got list" in notes[-1]
    write_json(tmp_path / name, RECORD)
    assert reader(tmp_path) == RECORD
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]        # written through a temporary, renamed


def test_config_values_missing_empty_or_cut_read_as_none(tmp_path):
    notes = []
    assert read_config_values(tmp_path, notes) is None and notes == []
    (tmp_path / CONFIG).write_text("")
    assert read_config_values(tmp_path, notes) is None
    (tmp_path / CONFIG).write_text("seed: 0\ntrain: {steps: 12, log_e")   # cut inside a mapping
    assert read_config_values(tmp_path, notes) is None and "not readable YAML" in notes[-1]
    (tmp_path / CONFIG).write_text("seed: 0\ntrain: {steps: 12}\n")
    assert read_config_values(tmp_path)["train"]["steps"] == 12


def half_written(run: Path, steps=(1, 2, 3)) -> Path:
    "A metrics.jsonl of `steps`, then a line cut mid-append (a writer killed)."
    for s in steps: append_metrics(run, {"step": s, "loss": 1.0 / s, "phase": "warmup"})
    with open(run / METRICS, "ab") as f: f.write(b'{"step": 4, "loss": 0.2')
    return run


def test_read_metrics_skips_a_half_written_last_line_and_notes_it(tmp_path):
    assert read_metrics(tmp_path) == []                                   # missing
    (tmp_path / METRICS).write_text("")
    notes = []
    assert read_metrics(tmp_path, notes) == [] and notes == []            # empty: nothing damaged
    half_written(tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path, notes)] == [1, 2, 3]
    assert len(notes) == 1 and "line 4" in notes[0]


def test_last_metrics_is_the_last_complete_record(tmp_path):
    assert last_metrics(tmp_path) is None
    (tmp_path / METRICS).write_text("")
    assert last_metrics(tmp_path) is None
    half_written(tmp_path)
    assert last_metrics(tmp_path)["step"] == 3
    assert last_metrics(tmp_path, tail=100)["step"] == 3                 # a tail that starts mid-line
    with open(tmp_path / METRICS, "ab") as f: f.write(b'\n{"loss": 1}\n42\n')   # not records: skipped
    assert last_metrics(tmp_path)["step"] == 3


def test_read_curves_skips_a_half_written_line_and_agrees_with_read_metrics(tmp_path):
    assert read_curves(tmp_path) == ({}, 0)
    (tmp_path / METRICS).write_text("")
    assert read_curves(tmp_path) == ({}, 0)
    clean = tmp_path / "clean"; clean.mkdir()
    for s in (1, 2, 3): append_metrics(clean, {"step": s, "loss": 1.0 / s, "phase": "warmup"})
    notes = []
    curves, n = read_curves(half_written(tmp_path), notes)
    fast, n_fast = read_curves(clean)                                     # pyarrow's reading, where installed
    assert n == n_fast == 3 and len(notes) == 1 and "line 4" in notes[0]
    assert list(curves) == list(fast) == ["loss"]                         # text is not a metric
    np.testing.assert_array_equal(curves["loss"][0], [1, 2, 3]); np.testing.assert_array_equal(curves["loss"][0], fast["loss"][0])
    np.testing.assert_allclose(curves["loss"][1], [r["loss"] for r in read_metrics(tmp_path)])
    np.testing.assert_allclose(curves["loss"][1], fast["loss"][1])


def test_truncate_metrics_keeps_records_to_the_step_and_warns_on_damaged_lines(tmp_path):
    assert truncate_metrics(tmp_path, 5) == 0 and not (tmp_path / METRICS).exists()   # nothing to truncate
    (tmp_path / METRICS).write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # an empty file: no warning
        assert truncate_metrics(tmp_path, 5) == 0
    half_written(tmp_path)
    with pytest.warns(UserWarning, match="dropped 1 damaged line"):
        assert truncate_metrics(tmp_path, 2) == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / METRICS).read_text().endswith("}\n")              # the next append starts a line of its own


def test_a_running_status_whose_process_is_gone_reads_interrupted(tmp_path):
    write_json(tmp_path / STATUS, {"state": "running", "step": 7, "pid": 2 ** 22 + 1, "host": "gone.example"})
    status = read_status(tmp_path)
    assert status["state"] == "interrupted" and "is gone" in status["message"] and status["step"] == 7


def test_the_status_table_and_the_stage_plot_read_a_half_written_metrics_line(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from prepretrain_lit.pipeline import status_rows
    from prepretrain_lit.pipeline_stage import plot_metrics
    run = tmp_path / "run"; run.mkdir()
    half_written(run)
    write_json(run / STATUS, {"state": "complete", "step": 3, "message": ""})
    (row,) = status_rows(tmp_path)
    assert (row["state"], row["step"], row["loss"]) == ("complete", 3, pytest.approx(1 / 3))
    fig = plot_metrics(run)
    assert fig.axes[0].lines[0].get_xdata().tolist() == [1, 2, 3]
