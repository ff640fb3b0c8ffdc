"""The installed package (a wheel, as the Dockerfile's `pip install .` builds) holds every file the
source tree's packages hold: C sources and headers the CPU kernels compile from at run time, chat
templates. A file left out of pyproject.toml's package data breaks only non-editable installs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "server")


def _source_files() -> set[str]:
    files = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(ROOT).as_posix())
    return files


def test_the_wheel_holds_every_file_of_the_packages(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend, needed without build isolation (no network)")
    # built from a copy, as the Dockerfile copies them: an in-tree build/ folder keeps stale files
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(tree), "-w", str(tmp_path / "dist")], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name for name in archive.namelist() if name.split("/", 1)[0] in PACKAGES}
    source = _source_files()
    assert {"model/layers/native/decode_step.h", "model/layers/native/paged_decode.c"} <= source
    assert source - in_wheel == set()
