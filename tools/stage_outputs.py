"""Give each stage notebook (nbs/stages/*.ipynb) the outputs of one tiny run, so a reader sees what it produces.

    .venv/bin/python tools/stage_outputs.py            # a few minutes on 2 CPU cores
    .venv/bin/nbdev_clean && git add nbs/stages        # then commit

It runs experiments/demo.yaml on tiny settings (one seed, a few steps, small datasets; plus a SplitMask stage on the
same shapes) with the real runner, then copies the outputs of one executed run per stage kind into the source notebook,
cell by cell (papermill keeps cell ids), with the run folder written `runs/...`, progress bars reduced to their last
state, widget views (tqdm's) dropped and PNG figures over `JPEG_FROM_KB` stored as JPEG (photos of shapes compress
badly as PNG); a figure still over `MAX_IMAGE_KB` is left out (a line says so). The parameters cell keeps the
notebook's defaults: the first markdown cell says which tiny settings made the outputs shown.
"""
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "nbs" / "stages"
JPEG_FROM_KB = 40
MAX_IMAGE_KB = 120
TINY = ["seed=[0]", "steps=10", "shapes.num_samples=128", "batch_size=16", "lowshot.shots=[1, 5]",
        "lowshot.splits=2", "overrides=[data.num_workers=0, eval.num_workers=0, train.log_every=2]"]
RUNS = {"shards": "demo/shapes/main", "mae": "demo/mae/seed=0", "wsp": "demo/wsp/from_mae,seed=0", "splitmask": "sm/splitmask/main",
        "teacher_mim": "sm/teacher_mim/main",
        **{k: f"demo/{k}/seed=0,init=mae" for k in ("knn", "lowshot", "linear_probe", "finetune", "zeroshot")},
        "report": "demo/report/main"}
NOTE = "*Outputs shown: one tiny run (`tools/stage_outputs.py`: "


def clean_text(text: str, root: Path) -> str:
    "A stream's text as its last screen showed it (`\\r` progress updates collapsed), the run folder as `runs/`."
    text = text.replace(str(root) + "/", "runs/").replace(str(root), "runs")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def smaller_image(png_b64: str) -> tuple[str, str]:
    "`(mime, base64)`: the PNG as it is when small, else as a JPEG (quality 80) when that is smaller."
    import base64
    import io
    from PIL import Image
    if len(png_b64) * 3 / 4 / 1024 <= JPEG_FROM_KB: return "image/png", png_b64
    image = Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    jpeg = base64.b64encode(buf.getvalue()).decode()
    return ("image/jpeg", jpeg) if len(jpeg) < len(png_b64) else ("image/png", png_b64)


def clean_outputs(outputs: list, root: Path) -> list:
    out = []
    for o in outputs:
        o = dict(o)
        if o["output_type"] == "stream":
            o["text"] = clean_text("".join(o["text"]) if isinstance(o["text"], list) else o["text"], root)
        elif o["output_type"] in ("display_data", "execute_result"):
            if any("widget" in k for k in o["data"]): continue           # a progress bar's view: nothing to see saved
            data = dict(o["data"])
            if "image/png" in data:
                mime, image = smaller_image("".join(data.pop("image/png")))
                if len(image) * 3 / 4 / 1024 > MAX_IMAGE_KB:
                    out.append({"output_type": "stream", "name": "stdout",
                                "text": f"[a {len(image) * 3 // 4 // 1024} KB figure, left out of the saved notebook]\n"})
                    continue
                data[mime] = image
            for k, v in data.items():
                if k.startswith("text/"): data[k] = clean_text("".join(v) if isinstance(v, list) else v, root)
            o["data"] = data
            if o["output_type"] == "execute_result": o["execution_count"] = None
        elif o["output_type"] == "error": continue
        out.append(o)
    return out


def graft(kind: str, executed: Path, root: Path) -> None:
    "Copy the outputs of `executed` into nbs/stages/<kind>.ipynb, by cell id; note the settings in its first markdown cell."
    path = STAGES / f"{kind}.ipynb"
    nb, ran = json.loads(path.read_text()), json.loads(executed.read_text())
    outputs = {c.get("id"): c.get("outputs", []) for c in ran["cells"] if c["cell_type"] == "code"}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code": cell["outputs"] = clean_outputs(outputs.get(cell.get("id"), []), root)
    first = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    text = re.sub(r"\n\n\*Outputs shown: .*$", "", "".join(first["source"]), flags=re.S)
    settings = ("a one-stage experiment on 128 built-in shapes, `steps=10`, `batch_size=16`" if kind == "splitmask" else
                "the same experiment's SplitMask trunk as the teacher, `steps=10`, `batch_size=16`" if kind == "teacher_mim" else
                "experiments/demo.yaml with " + ", ".join(f"`{s}`" for s in TINY if not s.startswith("overrides")))
    first["source"] = (text + f"\n\n{NOTE}{settings}); the parameters cell keeps the notebook's defaults.*").splitlines(True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    from prepretrain_lit.pipeline_spec import EXPERIMENTS_DIR
    from prepretrain_lit.pipeline import run_experiment
    if argv[:1] == ["--from"]:          # graft again from runs made earlier (their `runs` folder); `--only KIND ...`
        root, only = Path(argv[1]), argv[3:] if argv[2:3] == ["--only"] else list(RUNS)
        for kind in only: graft(kind, root / RUNS[kind] / "executed.ipynb", root)
        return 0
    root = Path(tempfile.mkdtemp(prefix="stage-outputs-")) / "runs"
    outcomes = run_experiment(EXPERIMENTS_DIR / "demo.yaml", out=root, overrides=TINY, progress=False, jobs=2)
    sm = Path(tempfile.mkdtemp()) / "sm.yaml"
    sm.write_text(yaml.safe_dump({"name": "sm", "stages": {
        "shapes": {"notebook": "shards", "params": {"manifest": "shapes", "num_samples": 128}},
        "splitmask": {"notebook": "splitmask", "params": {"steps": 10, "batch_size": 16, "overrides": ["data.num_workers=0", "train.log_every=2"]},
                      "inputs": {"dataset": "shapes/shapes.yaml"}},
        "teacher_mim": {"notebook": "teacher_mim", "params": {"steps": 10, "batch_size": 16, "overrides": ["data.num_workers=0", "train.log_every=2"]},
                        "inputs": {"dataset": "shapes/shapes.yaml", "teacher": "splitmask"}}}}))
    outcomes += run_experiment(sm, out=root, progress=False)
    bad = [(o.run.id, o.state, o.note) for o in outcomes if o.state != "complete"]
    if bad: print(f"not all runs completed: {bad}", file=sys.stderr); return 1
    for kind, run in RUNS.items(): graft(kind, root / run / "executed.ipynb", root)
    sizes = {p.name: p.stat().st_size // 1024 for p in sorted(STAGES.glob("*.ipynb"))}
    print("stage notebooks (KB):", sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
