"""What the trainer's tests share: the tiny config they train, a run's weights and logged steps, waiting on an event."""
import json
import time
from pathlib import Path

import torch

from prepretrain_lit.schema import RunConfig
from prepretrain_lit.presets import load_config

TINY = ["data.dataset=synthetic", "model.depth=2", "model.decoder_depth=1", "train.log_every=1"]


def tiny(*overrides: str, stage: str | None = None) -> RunConfig:
    "The `tiny` preset on synthetic images, 2 blocks, a log line every step; `overrides` as `--set` takes them."
    return load_config(preset="tiny", stage=stage, overrides=[*TINY, *overrides])


def weights(run: Path) -> dict:
    "The model tensors of run folder `run`'s `model.pt`."
    return torch.load(run / "model.pt", weights_only=True)["model"]


def steps_logged(run: Path) -> list[int]:
    """The steps of `run`'s metrics.jsonl, in the order they were written; complete lines only, so that a test polling
    a file another process is writing never reads a line half-written."""
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().split("\n")[:-1] if line]


def wait_for(predicate, timeout: float = 120.0) -> bool:
    "Whether `predicate()` became true within `timeout` s (checked every 20 ms: files another process writes)."
    end = time.time() + timeout
    while time.time() < end:
        if predicate(): return True
        time.sleep(0.02)
    return False
