"""Packaging: a wheel built from this tree holds what a ``pip install`` user needs away from the repository
(the shipped data, the recipes with their config groups, the example recipe, every module), and no tests.

The wheel is built offline from a copy of the tree's files (``git ls-files``: tracked and untracked, not
ignored), so the checkout gets no ``build/`` or ``*.egg-info`` and local runs under ignored folders stay out.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("polydiff", "domains", "benchmarks", "examples", "recipes")
# Everything tracked below these folders must be in the wheel; below benchmarks/ only modules (results,
# device scripts are repository-only).
WHOLE = ("polydiff", "domains", "examples", "recipes")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _source_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an unpacked sdist): walk the tree
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file()
            and not any(
                part in ("__pycache__", ".git", "build", "runs") or part.endswith(".egg-info")
                for part in p.relative_to(ROOT).parts
            )
        ]
    return sorted(f for f in files if (ROOT / f).is_file() and "__pycache__" not in f)


@pytest.fixture(scope="module")
def source_files() -> list[str]:
    return _source_files()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, source_files) -> zipfile.ZipFile:
    # Versions from the installed metadata: importing pip or setuptools here would trip setuptools' distutils shim.
    try:
        installed = {name: metadata.version(name) for name in ("pip", "setuptools")}
    except metadata.PackageNotFoundError as err:
        pytest.skip(f"an offline wheel build needs pip and setuptools installed here ({err} is not)")
    needed = re.search(r'requires\s*=\s*\[[^\]]*"setuptools>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    if needed and _version(installed["setuptools"]) < _version(needed.group(1)):
        pytest.skip(
            f"an offline wheel build needs setuptools>={needed.group(1)} installed here "
            f"(found {installed['setuptools']}); pip install -e '.[test]' brings it"
        )
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for f in source_files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-v",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (whl,) = out.glob("polydiff-*.whl")
    with zipfile.ZipFile(whl) as zf:
        zf.build_log = proc.stdout + proc.stderr
        yield zf


def test_wheel_holds_every_package_file(wheel, source_files):
    names = set(wheel.namelist())
    wanted = [
        f
        for f in source_files
        if f.split("/", 1)[0] in WHOLE
        or (f.startswith("benchmarks/") and f.endswith(".py") and not f.startswith("benchmarks/results/"))
    ]
    missing = [f for f in wanted if f not in names]
    assert not missing, f"{len(missing)} file(s) of the source tree are not in the wheel, e.g. {missing[:10]}"


def test_wheel_holds_data_recipes_and_example(wheel):
    names = set(wheel.namelist())
    flac = [n for n in names if n.startswith("domains/audio/data/spoken_digits/") and n.endswith(".flac")]
    assert len(flac) >= 800 and "domains/audio/data/spoken_digits/metadata.csv" in names
    for recipe in ("audio_unet", "image_unet", "molecule_egnn"):
        assert f"recipes/{recipe}.yaml" in names
        assert {f"recipes/{recipe}/profile/cpu.yaml", f"recipes/{recipe}/profile/gpu.yaml"} <= names
    assert "examples/points.yaml" in names and "examples/points.py" in names
    assert "domains/molecule/bonds.py" in names  # EDM's bond-length tables


def test_wheel_has_the_recipes_the_benchmark_suite_reads(wheel):
    """benchmarks/suite.py reads recipes beside the benchmarks package (site-packages/recipes when installed)."""
    from benchmarks.suite import suites

    names = set(wheel.namelist())
    recipes = {spec.recipe for suite in suites().values() for spec in suite.values()}
    assert recipes and not [r for r in sorted(recipes) if r not in names]


def test_wheel_leaves_out_tests_and_results(wheel):
    tops = {n.split("/", 1)[0] for n in wheel.namelist() if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == set(PACKAGES), tops
    assert not [n for n in wheel.namelist() if n.startswith(("tests/", "benchmarks/results/")) or "__pycache__" in n]


def test_wheel_builds_without_setuptools_warnings(wheel):
    """Deprecations (the license table: an error from 2027-02-18) and data folders setuptools would drop."""
    flagged = [
        line.strip()
        for line in wheel.build_log.splitlines()
        if "SetuptoolsDeprecationWarning" in line
        or "Package would be ignored" in line
        or "is absent from the `packages` configuration" in line
    ]
    assert not flagged, flagged[:5]


def test_wheel_metadata(wheel):
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(info).decode())
    assert meta["Name"] == "polydiff" and meta["Requires-Python"] == ">=3.10"
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "polydiff" / "__init__.py").read_text(), re.M)
    assert version and meta["Version"] == version.group(1)
    assert meta["License-Expression"] == "MIT" and "LICENSE" in (meta.get_all("License-File") or [])
    assert {"test", "bench"} <= set(meta.get_all("Provides-Extra"))
    entry = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert re.search(r"^polydiff = polydiff\.cli:main$", entry, re.M)
