"""Guards of the package layout: platform/ must never shadow the standard library."""

import ast
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


def _sslab_imports() -> dict[str, set[str]]:
    """Module -> the sslab modules it imports, at the top or inside a function (read, not run)."""
    modules = {
        f"sslab.{folder}.{path.stem}": path
        for folder in ("platform", "methods")
        for path in (REPO / folder).glob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = imported & modules.keys()
    return graph


def test_platform_and_methods_import_without_cycles():
    """Layers: config (the schema) imports nothing of sslab; validation sits above data,
    backbones and methods; the loop, the study and the CLI above that. A cycle, even through an
    import inside a function, means two modules each need the other to be read."""
    graph = _sslab_imports()
    assert graph["sslab.platform.config"] == set()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + (module,)
            raise AssertionError("import cycle: " + " -> ".join(m.rsplit(".", 1)[-1] for m in cycle))
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_no_platform_module_is_a_thousand_things():
    """One concern per module: none past ~500 lines (the schema, config.py, is the longest)."""
    lengths = {path.name: len(path.read_text().splitlines()) for path in (REPO / "platform").glob("*.py")}
    assert max(lengths.values()) <= 520, sorted(lengths.items(), key=lambda item: -item[1])[:3]
