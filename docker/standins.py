"""Empty stand-ins for the packages pyproject.toml installs (and its readme), so an image
can install cogpipe's dependencies, editable, from pyproject.toml alone: a change of the
source then reuses that layer (docker/Dockerfile). `--remove` deletes them again once
installed, before the source is copied in their place.

    python3 standins.py [--remove]      # in the folder of pyproject.toml
"""

import shutil
import sys
import tomllib
from pathlib import Path

tool = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
folders = {}  # "cogpipe.models" lives in the folder cogpipe/models
for package in tool["packages"]:
    top, *sub = package.split(".")
    folders[package] = Path(tool["package-dir"].get(top, top), *sub)
if sys.argv[1:] == ["--remove"]:
    for package, folder in folders.items():
        if "." not in package:
            shutil.rmtree(folder)
    Path("README.md").unlink()
else:
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").touch()
    Path("README.md").touch()
