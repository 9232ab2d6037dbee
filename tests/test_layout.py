"""Guards of the package layout: platform/ must never shadow the standard library."""

import subprocess
import sys
from pathlib import Path

import tomllib

from conftest import REPO


def test_no_init_files_at_top_level():
    # A platform/__init__.py on sys.path replaces Python's `platform`, breaking torch/ray/mlflow.
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "methods" / "__init__.py").exists()


def test_import_platform_from_repo_root_is_stdlib():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import platform, sslab.platform.train; "
            "print(platform.__file__); print(platform.python_version())",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert Path(out[0]).parent == Path(subprocess.__file__).parent  # the stdlib folder
    assert out[1].count(".") == 2


def test_setuptools_packages_list_every_source_folder():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    for package, folder in mapping.items():
        for sub in (REPO / folder).rglob("*.py"):
            rel = sub.parent.relative_to(REPO / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in listed, f"{name} (holds {sub.name}) is missing from tool.setuptools.packages"
