"""o2o installs under one namespace: no top-level `datasets`, `envs`, `actor` or `learner`."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

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
    for package in ("envs", "datasets", "transport", "learner", "actor", "configs", "experiments"):
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
    "actor": {"actor", "transport", "datasets", "envs"},
    "learner": {"learner", "transport", "datasets", "envs", "configs"},
    # The experiment runner and report start o2o's commands and read their files: no learner import.
    "experiments": {"experiments", "datasets", "envs"},
}


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


LAUNCHERS = {"learner/launch.py": {"actor"}}  # o2o-launch composes the actor's config to start actors


def test_every_package_imports_only_what_its_direction_allows():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            extra = LAUNCHERS.get(str(path.relative_to(ROOT)), set())
            for name in imported_modules(path):
                parts = name.split(".")
                if parts[0] == "torch" and package != "learner":
                    wrong.append(f"{path.relative_to(ROOT)} imports torch")
                if parts[0] == "o2o" and len(parts) > 1 and parts[1] not in allowed | extra:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []
