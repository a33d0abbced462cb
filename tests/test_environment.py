"""The pinned install: settings.ini (loose), requirements.lock (exact) and environment.yml (conda) agree."""
import configparser
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from project import ROOT
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)$")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"): continue
        m = PIN.match(line.strip())
        assert m, f"requirements.lock line is not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def settings_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    return [Requirement(r) for key in ("requirements", "dev_requirements") for r in shlex.split(d[key])]


def environment() -> tuple[str, dict[str, str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d.split("=", 1)[1] for d in deps if isinstance(d, str) and d.startswith("python="))
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    pins = {}
    for line in pip:
        m = PIN.match(line)
        assert m, f"environment.yml pip entry is not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return python, pins


def test_every_settings_requirement_is_locked_within_its_range():
    pins = lock_pins()
    for req in settings_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in settings.ini but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside settings.ini's {req}: run `make lock`"


def test_environment_yml_carries_the_locks_pins():
    python, env_pins = environment()
    pins = lock_pins()
    header = re.search(r"for Python (\d+\.\d+)", (ROOT / "requirements.lock").read_text()).group(1)
    assert python == header, f"environment.yml asks for python={python}, the lock was resolved for {header}"
    for name, version in env_pins.items():
        assert pins.get(name) == version, f"environment.yml pins {name}=={version}, the lock {pins.get(name)}"
    missing = set(pins) - set(env_pins) - {"pip"}
    assert not missing, f"pinned in requirements.lock but not in environment.yml: {sorted(missing)}"


def test_settings_requirements_are_in_environment_yml():
    _, env_pins = environment()
    for req in settings_requirements():
        assert canonicalize_name(req.name) in env_pins, f"{req.name} missing from environment.yml"


def test_lock_uses_the_registry_default_torch_build():
    pins = lock_pins()
    assert "+" not in pins["torch"] and "+" not in pins["torchvision"], \
        "torch/torchvision must be the registry's default build, not a local-version wheel such as +cpu"
    text = (ROOT / "requirements.lock").read_text()
    assert "--find-links" not in text and "file://" not in text and "/opt/" not in text


def test_torchvision_and_timm_import_with_the_installed_torch():
    import timm
    import torch
    import torchvision
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]  # a compiled op
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=16)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 192)                          # pooled features, no head


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only the project's own .venv is installed from the lock")
def test_the_venv_holds_exactly_the_locked_versions():
    wrong = {}
    for name, version in lock_pins().items():
        try: installed = metadata.version(name)
        except metadata.PackageNotFoundError: installed = None
        if installed != version: wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed: {wrong}; run `make install`"
