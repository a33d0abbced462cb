"""Packaging for prepretrain-lit: every value comes from settings.ini (nbdev's single source)."""
import shlex
import shutil
from configparser import ConfigParser
from pathlib import Path

import setuptools
from setuptools.command.build_py import build_py

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": "Apache-2.0"}  # SPDX expression; setuptools deprecates license classifiers
statuses = ["Planning", "Pre-Alpha", "Alpha", "Beta", "Production/Stable", "Mature", "Inactive"]
py_versions = ["3.10", "3.11", "3.12", "3.13"]
min_python = cfg["min_python"]

# What the CLI needs besides the code: the built-in manifests, the stage notebooks and the shipped experiments.
# The checkout's folders stay the one source; a build copies them into the package as `_shipped/<name>`, where
# the package looks first (an editable install, which has no `_shipped/`, reads the checkout's folders).
SHIPPED = {"data_manifests": "data_manifests", "stages": "nbs/stages", "experiments": "experiments"}
SHIPPED_FILES = ("*.yaml", "*.ipynb", "*.md")


class BuildWithShipped(build_py):
    "build_py, then copy the `SHIPPED` folders (their yaml, notebooks and READMEs) into `<lib>/_shipped/`."
    def run(self):
        super().run()
        for name, source in SHIPPED.items():
            dest = Path(self.build_lib) / cfg["lib_name"] / "_shipped" / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for pattern in SHIPPED_FILES:
                for f in sorted(Path(source).glob(pattern)): shutil.copy2(f, dest / f.name)

setuptools.setup(
    name=cfg["repo"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=licenses[cfg["license"]],
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    classifiers=[
        "Development Status :: " + cfg["status"] + " - " + statuses[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"],
        "Natural Language :: " + cfg["language"],
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ] + ["Programming Language :: Python :: " + v for v in py_versions[py_versions.index(min_python):]],
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    python_requires=">=" + min_python,
    install_requires=shlex.split(cfg.get("requirements", "")),
    extras_require={"dev": shlex.split(cfg.get("dev_requirements", "")),
                    "bench": shlex.split(cfg.get("bench_requirements", ""))},   # loader peers: benchmarks only, unlocked
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f'{cfg["lib_path"]}={cfg["lib_path"]}._modidx:d'],
        # stage kinds defined in chapters of their own (a chapter registers its stage when imported; see 00ab_registry)
        "prepretrain_lit.stages": [f'{m}={cfg["lib_path"]}.{m}' for m in cfg.get("stage_modules", "").split()],
    },
    zip_safe=False,
    cmdclass={"build_py": BuildWithShipped},
)
