"""Write README.md from nbs/index.ipynb (nbdev's own `nbdev_readme` needs quarto, which is not installed).

Markdown cells are copied as they are (links to `images/` made relative to the root); code cells become ```python blocks with their `#|` directive
lines dropped (a `#| hide` cell is left out), followed by their text outputs. `make readme` and
`make export` run it; `make test` fails when README.md differs from what it would write.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
BANNER = "<!-- GENERATED from nbs/index.ipynb by tools/readme.py (`make readme`): edit the notebook, not this file. -->\n"


def _text(source) -> str:
    return "".join(source) if isinstance(source, list) else source


def _outputs(cell: dict) -> list[str]:
    "The text of a code cell's outputs (streams and text/plain results), as fenced blocks."
    blocks = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream": text = _text(out.get("text", ""))
        elif "text/markdown" in out.get("data", {}): blocks.append(_text(out["data"]["text/markdown"]).strip()); continue
        elif "text/plain" in out.get("data", {}): text = _text(out["data"]["text/plain"])
        else: continue
        if text.strip(): blocks.append("```\n" + text.rstrip("\n") + "\n```")
    return blocks


def render(notebook: Path = NOTEBOOK) -> str:
    "The README text for `notebook`."
    parts = []
    for cell in json.loads(notebook.read_text())["cells"]:
        source = _text(cell["source"])
        if cell["cell_type"] == "markdown":   # images beside the notebooks (nbs/images/) are linked from the root
            parts.append(source.strip().replace("](images/", "](nbs/images/"))
        elif cell["cell_type"] == "code":
            lines = source.splitlines()
            if any(line.replace(" ", "").startswith("#|hide") for line in lines): continue
            code = "\n".join(line for line in lines if not line.startswith("#|")).strip()
            if code: parts.append("```python\n" + code + "\n```")
            parts.extend(_outputs(cell))
    return BANNER + "\n" + "\n\n".join(p for p in parts if p) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if README.exists() and README.read_text() == text else 1)
    README.write_text(text)
    print(f"wrote {README.relative_to(ROOT)} from {NOTEBOOK.relative_to(ROOT)}")
