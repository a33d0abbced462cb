"""The report at cluster size: `gather` + `save_table` over N generated run folders of L metric lines each.

Writes N training-stage folders (`stage.json`, `config.yaml`, a `metrics.jsonl` of L lines with the trainer's keys:
loss, lr, images_per_s, data_skipped, memory_mb, grad_norm and two loss parts) and one linear-probe `results.json`
per 10 of them into a temporary folder, then reads them in a fresh subprocess per way (so each peak RSS is its own):

- `plain`: the old way: a DataFrame per folder (read, melt, concatenate, sort), every line kept (the old default,
  `max_points=2000`), `results.csv` and `results.parquet` written;
- `columnar-full`: the columnar gather with every point kept (`max_points=None`): the same rows as `plain`;
- `columnar`: the default: columnar, each curve thinned to 500 points as it is read, `results.parquet` (the CSV
  only when asked);
- `report`: all of `build_report` (what `prepretrain report` runs): the default gather and save, every figure (a band
  per recipe, not a line per run), the
  summary; its time is in the `gather s` column.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report_scale.py                 # N = 100 (all three) and 1000 (columnar ways)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/report_scale.py --runs 20 --lines 200 --quick   # seconds

Times are wall seconds on whatever the machine is doing; the ratios of one run are what to read.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = {"plain": dict(columnar=False, max_points=2000, csv=True),
        "columnar-full": dict(columnar=True, max_points=None, csv=False),
        "columnar": dict(columnar=True, max_points=500, csv=None),
        "report": dict(columnar=True, max_points=500, csv=None, report=True)}


def make_runs(root: Path, runs: int, lines: int) -> Path:
    "N WSP stage folders of `lines` metric lines each, and a linear probe per 10; returns the experiment folder."
    from prepretrain_lit.presets import load_config, save_config
    exp = root / "scale"
    cfg_path = root / "config.yaml"
    save_config(load_config(preset="tiny", overrides=["data.subset=5k"]), cfg_path)
    config_text = cfg_path.read_text()
    for i in range(runs):
        folder = exp / "wsp" / f"v{i:05d}"
        folder.mkdir(parents=True)
        axes = dict(model="vit_b16", subset="5k", mae_length=1.0, objective="wsp", seed=i % 5, init="mae" if i % 2 else "scratch")
        (folder / "stage.json").write_text(json.dumps(dict(experiment="scale", stage="wsp", variant=f"v{i:05d}", kind="wsp",
                                                           state="complete", axes=axes)))
        (folder / "config.yaml").write_text(config_text)
        with open(folder / "metrics.jsonl", "w") as f:
            for s in range(1, lines + 1):
                loss = 1.0 + 2.0 * math.exp(-3.0 * s / lines) + 0.01 * math.sin(s * 0.37 + i)
                f.write(json.dumps({"step": 10 * s, "loss": loss, "lr": 1e-3 * math.cos(0.5 * math.pi * s / lines),
                                    "images_per_s": 1000.0 + (s * 7919 + i) % 97, "data_skipped": 0, "memory_mb": 5123.4,
                                    "grad_norm": 0.5 + 0.1 * math.cos(s), "loss_a": 0.6 * loss, "loss_b": 0.4 * loss}) + "\n")
        if i % 10 == 0:
            probe = exp / "linear_probe" / f"v{i:05d}"
            probe.mkdir(parents=True)
            (probe / "stage.json").write_text(json.dumps(dict(experiment="scale", stage="linear_probe", variant=f"v{i:05d}",
                                                              kind="linear_probe", state="complete", axes=axes)))
            (probe / "results.json").write_text(json.dumps(dict(schema_version=1, kind="linear_probe", dataset="d",
                records=[{"metric": "top1", "value": 70.0 + i % 7, "seed": i % 5, "shots": None, "step": 10 * lines}])))
    return exp


def worker(way: str, exp: Path, out: Path) -> dict:
    "One way's gather and save, timed, in this (fresh) process."
    from prepretrain_lit.report import build_report
    from prepretrain_lit.report_table import gather, save_table
    opts = WAYS[way]
    if opts.get("report"):
        import matplotlib
        matplotlib.use("Agg")
        import pyarrow.parquet as pq
        start = time.perf_counter()
        paths = build_report(exp, out, max_reconstructions=0, max_points=opts["max_points"], verbose=False, csv=opts["csv"])
        if paths["skipped"]: print(json.dumps({"skipped": paths["skipped"]}), file=sys.stderr)
        files = [p for p in (paths["csv"], paths["parquet"]) if p is not None]
        return {"way": way, "rows": pq.ParquetFile(paths["parquet"]).metadata.num_rows, "gather_s": time.perf_counter() - start,
                "save_s": float("nan"), "table_mb": float("nan"),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "files": {p.name: p.stat().st_size / 2 ** 20 for p in files}}
    start = time.perf_counter()
    table = gather(exp, max_points=opts["max_points"], columnar=opts["columnar"])
    gathered = time.perf_counter() - start
    start = time.perf_counter()
    csv, parquet = save_table(table, out, csv=opts["csv"])
    saved = time.perf_counter() - start
    files = [p for p in (csv, parquet) if p is not None]
    return {"way": way, "rows": len(table), "gather_s": gathered, "save_s": saved,
            "table_mb": table.memory_usage(deep=False).sum() / 2 ** 20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "files": {p.name: p.stat().st_size / 2 ** 20 for p in files}}


def run_way(way: str, exp: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", way, "--exp", str(exp), "--out", str(out)],
                          capture_output=True, text=True)
    if proc.returncode: raise SystemExit(f"{way} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[100, 1000], help="numbers of runs (default: 100 1000)")
    parser.add_argument("--lines", type=int, default=2000, help="metric lines per run (default 2000)")
    parser.add_argument("--plain-max-runs", type=int, default=100, help="the plain (old) way only up to this many runs")
    parser.add_argument("--quick", action="store_true", help="all ways at every size (a smoke test)")
    parser.add_argument("--ways", nargs="+", choices=tuple(WAYS), default=list(WAYS), help="which ways to run (default: all)")
    parser.add_argument("--figures-to", type=Path, help="copy the report way's figures here (<dir>/<runs>/), to look at them")
    parser.add_argument("--worker", choices=tuple(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--exp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.exp, args.out))); return

    print(f"{'runs':>6} {'lines':>6} {'way':>14} {'rows':>10} {'gather s':>9} {'save s':>7} {'peak RSS MB':>12} "
          f"{'table MB':>9}  files (MB)")
    for n in args.runs:
        with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
            start = time.perf_counter()
            exp = make_runs(Path(tmp), n, args.lines)
            made = time.perf_counter() - start
            size = sum(p.stat().st_size for p in exp.rglob("metrics.jsonl")) / 2 ** 20
            print(f"# {n} runs x {args.lines} lines written in {made:.0f} s ({size:.0f} MB of metrics.jsonl)")
            ways = [w for w in args.ways if w != "plain" or args.quick or n <= args.plain_max_runs]
            for way in ways:
                r = run_way(way, exp, Path(tmp) / f"out-{way}")
                if way == "report" and args.figures_to:
                    import shutil
                    shutil.copytree(Path(tmp) / f"out-{way}" / "figures", args.figures_to / str(n), dirs_exist_ok=True)
                files = ", ".join(f"{k} {v:.1f}" for k, v in r["files"].items())
                print(f"{n:>6} {args.lines:>6} {way:>14} {r['rows']:>10,} {r['gather_s']:>9.1f} {r['save_s']:>7.1f} "
                      f"{r['peak_rss_mb']:>12.0f} {r['table_mb']:>9.0f}  {files}", flush=True)


if __name__ == "__main__":
    main()
