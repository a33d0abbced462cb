"""`make test`: every check CI runs, each one named, with a summary that says which failed.

Steps (all run, even after a failure, so one run shows every problem):
  sync       nbdev_export and tools/readme.py must not change prepretrain_lit/ or README.md
  clean      nbdev_clean must not change any notebook
  notebooks  every notebook in nbs/ executes (nbdev_test), slow and multiproc cells included; the stage
             notebooks in nbs/stages/ are skipped here (their defaults may be cluster-sized): pytest runs
             each of them through papermill with tiny parameters (tests/test_pipeline.py)
  pytest     tests/ passes; a run that collects nothing (pytest exit 5) is a failure
The sync and clean steps put every file back as it was, so `make test` never edits the work tree.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LIB = ROOT / "prepretrain_lit"
NBS = ROOT / "nbs"
STAGES_SKIP = r"^([_.]|stages$)"   # nbdev's default folder skip (^[_.]) plus nbs/stages/
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, **kw)


def _changed(old: Path, new: Path) -> list[str]:
    "Paths (relative) that differ between two folder trees, ignoring caches."
    out = []
    def walk(cmp: filecmp.dircmp, rel: Path):
        for name in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files:
            if name != "__pycache__": out.append(str(rel / name))
        for name, sub in cmp.subdirs.items():
            if name != "__pycache__": walk(sub, rel / name)
    walk(filecmp.dircmp(old, new, ignore=["__pycache__", ".ipynb_checkpoints"]), Path(LIB.name))
    return sorted(out)


def step_sync() -> tuple[bool, str]:
    "nbdev_export must reproduce prepretrain_lit/ exactly, and tools/readme.py README.md."
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / LIB.name
        shutil.copytree(LIB, snapshot, ignore=IGNORED)
        readme_before = (ROOT / "README.md").read_bytes() if (ROOT / "README.md").exists() else None
        export = _run([BIN / "nbdev_export"])
        readme = _run([sys.executable, ROOT / "tools" / "readme.py"], stdout=subprocess.DEVNULL)
        changed = sorted(set(_changed(snapshot, LIB)) | set(_orphans()))
        if (ROOT / "README.md").read_bytes() != readme_before: changed.append("README.md")
        if changed:  # put the tree back: `make test` reports, it does not rewrite
            for line in _diff_preview(snapshot, changed): print(line)
            shutil.rmtree(LIB)
            shutil.copytree(snapshot, LIB)
            if readme_before is None: (ROOT / "README.md").unlink(missing_ok=True)
            else: (ROOT / "README.md").write_bytes(readme_before)
    if export.returncode or readme.returncode:
        return False, "nbdev_export or tools/readme.py failed (see its output above)"
    if changed:
        return False, ("the package or README differ from what the notebooks export: " + ", ".join(changed) +
                       ". prepretrain_lit/ and README.md are generated: edit the notebook instead of the "
                       "file, then run `make export` and commit the result.")
    return True, "prepretrain_lit/ and README.md match the notebooks"


def _orphans() -> list[str]:
    "Modules in the package that no existing notebook generates (hand-written, or left from a renamed notebook)."
    out = []
    for path in sorted(LIB.rglob("*.py")):
        if path.name in ("__init__.py", "_modidx.py") or "__pycache__" in path.parts: continue
        head = path.read_text().splitlines()[:5]
        source = next((line.split("File to edit:")[1].strip().rstrip(".") for line in head if "File to edit:" in line), None)
        if source is None or not (path.parent / source).resolve().is_file():
            out.append(str(path.relative_to(ROOT)))
    return out


def _diff_preview(snapshot: Path, changed: list[str], limit: int = 40) -> list[str]:
    "A short unified diff (committed -> exported) of the changed files, for the log."
    import difflib
    lines = []
    for rel in changed:
        old = snapshot.parent / rel if rel != "README.md" else None
        new = ROOT / rel
        if old is None or not old.is_file() or not new.is_file(): continue
        lines += list(difflib.unified_diff(old.read_text().splitlines(), new.read_text().splitlines(),
                                           f"committed/{rel}", f"exported/{rel}", lineterm=""))[:limit]
    return lines


def step_clean() -> tuple[bool, str]:
    "nbdev_clean must leave every notebook as it is."
    before = {p: p.read_bytes() for p in NBS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts}
    clean = _run([BIN / "nbdev_clean"])
    changed = [p for p, data in before.items() if p.read_bytes() != data]
    for p in changed: p.write_bytes(before[p])  # report, do not rewrite
    if clean.returncode: return False, "nbdev_clean failed (see its output above)"
    if changed:
        names = ", ".join(str(p.relative_to(ROOT)) for p in changed)
        return False, (f"notebooks not clean (metadata or execution counts nbdev_clean would strip): {names}. "
                       "Run `make clean-nbs` and commit.")
    return True, f"{len(before)} notebooks clean"


def step_notebooks(fast: bool = False) -> tuple[bool, str]:
    "Execute every notebook with nbdev_test; slow and multiproc cells too unless `fast`, gpu cells on CUDA."
    flags = [] if fast else ["slow", "multiproc"]
    if _cuda_available(): flags.append("gpu")
    # One notebook at a time by default: on a 2-core machine two notebooks' torch threads fight over the same
    # cores and the whole step runs 3x slower than in sequence. Raise it on bigger machines.
    workers = os.environ.get("NOTEBOOK_WORKERS", "1")
    # nbs/stages/ holds papermill stage notebooks: tests/test_pipeline.py executes them with tiny parameters.
    res = _run([BIN / "nbdev_test", "--flags", " ".join(flags), "--timing", "--n_workers", workers,
                "--skip_folder_re", STAGES_SKIP])
    return res.returncode == 0, ("every notebook executed" if res.returncode == 0 else
                                 "a notebook failed to execute (its traceback is above)")


def _cuda_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"])
    return probe.returncode == 0


def step_pytest(fast: bool = False, paths: tuple[str, ...] = ("tests",)) -> tuple[bool, str]:
    "pytest on `paths`; exit 5 (nothing collected) is a failure."
    args = [sys.executable, "-m", "pytest", *paths]
    if fast: args += ["-m", "not slow and not multiproc"]
    res = _run(args)
    if res.returncode == 5: return False, "pytest collected no tests: an empty test run is a failure here"
    return res.returncode == 0, "tests passed" if res.returncode == 0 else f"pytest failed (exit {res.returncode})"


STEPS = {"sync": step_sync, "clean": step_clean, "notebooks": step_notebooks, "pytest": step_pytest}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="skip tests and cells marked slow or multiproc")
    parser.add_argument("--only", choices=list(STEPS), action="append", help="run only this step (repeatable)")
    args = parser.parse_args(argv)
    results = []
    for name in args.only or list(STEPS):
        print(f"\n== make test: {name}", flush=True)
        start = time.time()
        fn = STEPS[name]
        ok, message = fn(fast=args.fast) if name in ("notebooks", "pytest") else fn()
        results.append((name, ok, message, time.time() - start))
        print(f"-- {name}: {'ok' if ok else 'FAILED'}: {message}", flush=True)
    print("\n== make test summary")
    for name, ok, message, secs in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {name:<10} {secs:6.1f}s  {message}")
    failed = [name for name, ok, *_ in results if not ok]
    if failed: print(f"\nmake test FAILED at: {', '.join(failed)}")
    print(f"checks: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
