"""o2o installs under one namespace: no top-level `datasets`, `envs`, `actor` or `learner`."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_o2o_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("o2o-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"o2o", next(t for t in top_level if t.endswith(".dist-info"))}
    for package in ("envs", "datasets", "transport", "learner", "actor", "configs", "experiments", "launch"):
        assert f"o2o/{package}/__init__.py" in names
    assert "o2o/configs/pretrain.yaml" in names


def test_hugging_face_datasets_is_not_shadowed(tmp_path):
    # A stand-in for Hugging Face's `datasets`, installed beside o2o.
    fake = tmp_path / "datasets"
    fake.mkdir()
    (fake / "__init__.py").write_text("IS_HUGGING_FACE = True\n")
    code = textwrap.dedent(
        """
        import o2o.datasets, o2o.envs
        import datasets
        assert getattr(datasets, "IS_HUGGING_FACE", False), datasets.__file__
        import importlib.util
        for name in ("envs", "learner", "actor", "transport"):
            assert importlib.util.find_spec(name) is None, name
        print("ok")
        """
    )
    # Run from tmp_path so the repository folders are not on sys.path via the working directory.
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}
    )
    assert result.stdout.strip() == "ok", result.stderr


# Dependency direction (an entry may import the packages listed, and itself): a robot runs
# actor/transport/datasets/envs with numpy, onnxruntime, pyzmq, zarr and gymnasium alone.
ALLOWED = {
    "envs": {"envs"},
    "datasets": {"datasets", "envs"},
    "transport": {"transport", "datasets", "envs"},
    # A real arm's parts (robot/) run on the robot's machine too: no torch, no learner.
    "robot": {"robot", "datasets", "envs"},
    "actor": {"actor", "robot", "transport", "datasets", "envs"},
    "learner": {"learner", "transport", "datasets", "envs", "configs"},
    # The results matrix's cells and report read o2o's files: of the learner, only the metric names.
    "experiments": {"experiments", "datasets", "envs", "learner.metric_keys"},
    # The launchers start the learner and the actors as processes; nothing imports them.
    "launch": {"launch", "learner", "actor", "robot", "experiments", "transport", "datasets", "envs", "configs"},
}
TORCH_FREE = ["o2o.launch.launch", "o2o.launch.experiment", "o2o.launch.status", "o2o.experiments.report",
              "o2o.learner.metric_keys", "o2o.learner.commands"]  # fmt: skip
"""Modules outside the torch folder's reach that live in or next to it: a launcher prints without torch."""


def imported_modules(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def allowed_import(name: str, allowed: set[str]) -> bool:
    """Whether ``o2o.<package>[.<module>...]`` is in ``allowed`` (a package, or one module of it)."""
    parts = name.split(".")[1:]
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def test_every_package_imports_only_what_its_direction_allows():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            for name in imported_modules(path):
                parts = name.split(".")
                if parts[0] == "torch" and package != "learner":
                    wrong.append(f"{relative} imports torch")
                if parts[0] == "o2o" and len(parts) > 1 and not allowed_import(name, allowed):
                    wrong.append(f"{relative} imports {name}")
                if relative.parts[0] == "learner" and relative.parts[-1] == "launch.py":
                    wrong.append(f"{relative}: the launchers live in launch/")
    assert wrong == []


def test_the_direction_check_refuses_an_import_against_it():
    assert not allowed_import("o2o.learner.online", ALLOWED["experiments"])  # only metric_keys of the learner
    assert allowed_import("o2o.learner.metric_keys", ALLOWED["experiments"])
    assert not any(allowed_import("o2o.launch.launch", allowed) for package, allowed in ALLOWED.items()
                   if package != "launch")  # nothing imports the launchers  # fmt: skip


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_launchers_and_the_report_import_no_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
