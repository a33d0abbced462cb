"""The results the README quotes are the ones the report computed: the committed CPU study (`results/cpu_study/`).

`make demo` reruns the demo on every machine; the CPU study (`experiments/cpu_study.yaml`, ~90 minutes) is run once
and its report committed. These tests hold the chain together: the committed table gives the committed summary
(the report's own functions, rerun here), and every comparison the README's "What the CPU study shows" table quotes
is a line of that summary, numbers, spread and verdict alike.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from prepretrain_lit.report_summary import comparison_lines
from prepretrain_lit.report_table import load_table

from project import ROOT
STUDY = ROOT / "results" / "cpu_study"
SECTION = "## What the CPU study shows"


def summary_comparisons(path: Path) -> list[str]:
    "The bullet lines of the `## Comparisons` section of a report's summary.md."
    block = path.read_text().split("## Comparisons", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in block.strip().splitlines() if line.startswith("- ")]


def readme_rows(readme: str) -> list[list[str]]:
    "The body rows of every table in the README's CPU-study section, as lists of cell texts."
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set("-: ") for c in r) and r[0] != "judge"]


def quoted_line(row: list[str], lines: list[str]) -> str:
    "The summary line a README row `[judge, treatment, baseline, verdict]` quotes; AssertionError if none does."
    where, treated, base, claim = row
    found = [line for line in lines if line.startswith(f"{where}: {treated} vs {base}: ")]
    assert len(found) == 1, f"README row {row} is not one comparison of results/cpu_study/summary.md"
    return found[0]


def test_the_committed_summary_is_what_the_report_computes_from_the_committed_table():
    table = load_table(STUDY / "results.parquet")
    assert table.run.nunique() >= 190                     # the whole study, not a part of it
    assert comparison_lines(table) == summary_comparisons(STUDY / "summary.md")


def test_every_comparison_the_readme_quotes_is_the_reports_with_its_verdict():
    lines = summary_comparisons(STUDY / "summary.md")
    rows = readme_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 12 and all(len(r) == 4 for r in rows), rows
    for row in rows:
        assert f"': {row[3]}" in quoted_line(row, lines), f"README row {row}: the summary's verdict differs"


def test_a_misquoted_row_is_caught():
    lines = ["k-NN on digits-test (vit_w32), top1: MAE→WSP 71.0 ± 2.8 (n=3) vs WSP 70.4 ± 3.5 (n=3): MAE→WSP is ahead "
             "by 0.6, within the spread over seeds; the claim 'MAE→WSP beats WSP': within the spread"]
    row = ["k-NN on digits-test (vit_w32), top1", "MAE→WSP 71.0 ± 2.8 (n=3)", "WSP 70.4 ± 3.5 (n=3)", "within the spread"]
    assert f"': {row[3]}" in quoted_line(row, lines)
    with pytest.raises(AssertionError):
        quoted_line([row[0], "MAE→WSP 71.1 ± 2.8 (n=3)", row[2], row[3]], lines)   # one digit off
    readme = f"x\n{SECTION}\n\n| judge | a | b | verdict |\n|---|---|---|---|\n| {' | '.join(row)} |\n\n## Next\n| no |"
    assert readme_rows(readme) == [row]


def test_the_readme_shows_the_studys_figures():
    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    images = [part.split(")", 1)[0] for part in section.split("](")[1:]]
    assert images and all((ROOT / p).is_file() for p in images), images


def test_every_figure_the_committed_summary_shows_is_committed():
    text = (STUDY / "summary.md").read_text()
    images = [part.split(")", 1)[0] for part in text.split("](")[1:]]
    missing = [p for p in images if not (STUDY / p).is_file()]
    assert images and not missing, f"results/cpu_study/summary.md shows figures that are not in the repository: {missing}"
