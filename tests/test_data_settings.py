"""The data settings (discount, reward scale and bias, infinite-horizon MC rule) are declared once,
in ``datasets/data_settings.py``: every user lists them from ``dataclasses.fields(DataSettings)``,
and no other module re-declares one or gives it a default of its own."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

from o2o.datasets.data_settings import OLD_STORE_NAMES, DataSettings
from o2o.datasets.minari_io import load_transitions
from o2o.datasets.replay_store import ReplayStore, StoreConfig
from o2o.learner.config import DATA_FIELDS, CalQLConfig
from o2o.learner.online_data import OnlineData

ROOT = Path(__file__).resolve().parent.parent
NAMES = tuple(f.name for f in dataclasses.fields(DataSettings))
ALL_NAMES = {*NAMES, *OLD_STORE_NAMES}  # with the store's old spellings (gamma, infinite_horizon)
# mc_return.py ports the official calc_return_to_go: its math functions take gamma and
# infinite_horizon as plain parameters, and every caller passes them from a DataSettings.
# benchmarks/_d3rlpy_side.py configures d3rlpy (its own ``gamma``), in d3rlpy's environment.
EXEMPT = {ROOT / "datasets" / "data_settings.py", ROOT / "datasets" / "mc_return.py",
          ROOT / "benchmarks" / "_d3rlpy_side.py"}


def test_the_names_come_from_the_one_type():
    assert NAMES == ("discount", "reward_scale", "reward_bias", "mc_infinite_horizon")
    assert DATA_FIELDS == NAMES == DataSettings.names()
    # The agent's config inherits them (algo.reward_scale stays the user's key), not copied.
    assert issubclass(CalQLConfig, DataSettings)
    agent = {f.name: f for f in dataclasses.fields(CalQLConfig)}
    assert all(agent[n].default == f.default for n, f in ((f.name, f) for f in dataclasses.fields(DataSettings)))
    assert all(n not in vars(CalQLConfig).get("__annotations__", {}) for n in NAMES)
    # The store holds them whole; the loader, the store and the online learner take the type.
    store_fields = {f.name: f for f in dataclasses.fields(StoreConfig)}
    assert "DataSettings" in str(store_fields["data"].type) and not ALL_NAMES & set(store_fields)
    for function in (load_transitions, ReplayStore.create, OnlineData.__init__):
        params = inspect.signature(function).parameters
        assert "data" in params and "DataSettings" in str(params["data"].annotation), function
        assert not ALL_NAMES & set(params), function


def test_store_metadata_holds_the_settings_under_their_names(tmp_path):
    settings = DataSettings(0.9, 2.0, -0.5, True)
    ReplayStore.create(tmp_path / "replay", 3, 2, data=settings).close()
    attrs = ReplayStore.open(tmp_path / "replay").config.to_attrs()
    assert {n: attrs[n] for n in NAMES} == dataclasses.asdict(settings)
    assert not set(OLD_STORE_NAMES) & set(attrs)


def test_scale_is_the_float32_reward_rule():
    raw = np.array([0.0, -1.0, 0.3], np.float32)
    got = DataSettings(reward_scale=0.1, reward_bias=0.3).scale(raw)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (raw * np.float32(0.1) + np.float32(0.3)).astype(np.float32))
    assert DataSettings().differences(DataSettings(discount=0.9)) == {"discount": (0.99, 0.9)}


def redeclarations(source: str) -> list[str]:
    """Where a module declares a data setting again: a class field or a parameter default named
    like one, a constant passed for one, or a literal listing their names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                targets = [item.target] if isinstance(item, ast.AnnAssign) else getattr(item, "targets", [])
                found += [f"line {item.lineno}: class field {t.id}" for t in targets
                          if isinstance(t, ast.Name) and t.id in ALL_NAMES]  # fmt: skip
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            with_default = positional[len(positional) - len(args.defaults):]
            with_default += [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            found += [f"line {node.lineno}: default of parameter {a.arg}" for a in with_default if a.arg in ALL_NAMES]
        elif isinstance(node, ast.Call):
            found += [f"line {node.lineno}: {k.arg}={ast.unparse(k.value)}" for k in node.keywords
                      if k.arg in ALL_NAMES and isinstance(k.value, ast.Constant)]  # fmt: skip
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            listed = {i.value for i in items if isinstance(i, ast.Constant) and i.value in ALL_NAMES}
            if len(listed) >= 2 or listed & set(OLD_STORE_NAMES):
                found.append(f"line {node.lineno}: lists {sorted(listed)}")
    return found


def sources() -> list[Path]:
    folders = [p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests"]
    files = [f for folder in folders for f in folder.rglob("*.py")] + list((ROOT / "benchmarks").glob("*.py"))
    return sorted(f for f in files if f not in EXEMPT and ".venv" not in f.parts and "build" not in f.parts)


def test_no_module_redeclares_a_data_setting():
    files = sources()
    assert any(f.name == "config.py" and f.parent.name == "learner" for f in files)
    wrong = {str(f.relative_to(ROOT)): hits for f in files if (hits := redeclarations(f.read_text()))}
    assert not wrong, f"data settings declared outside datasets/data_settings.py: {wrong}"


@pytest.mark.parametrize("snippet", [
    "def load(dataset, gamma: float = 0.99): ...",
    "def create(*, reward_scale=1.0): ...",
    "class StoreConfig:\n    reward_bias: float = 0.0\n",
    "store = create(path, mc_infinite_horizon=False)",
    "wanted = {'gamma': a, 'reward_scale': b}",
    "FIELDS = ('discount', 'reward_scale')",
])  # fmt: skip
def test_the_check_catches_a_redeclaration(snippet):
    assert redeclarations(snippet)


def test_the_learner_refuses_a_store_made_with_other_data_settings(tmp_path):
    from o2o.datasets.replay_store import StoreError
    from o2o.learner.fleet import open_store

    ReplayStore.create(tmp_path / "replay", 3, 2, data=DataSettings(reward_scale=2.0, discount=0.9)).close()
    with pytest.raises(StoreError, match=r"discount 0.9 \(the agent: 0.99\), reward_scale 2.0 \(the agent: 1.0\)"):
        open_store(tmp_path / "replay", "unused", CalQLConfig(), fsync=False, abandon_idle_s=None)
    store = open_store(tmp_path / "replay", "unused", CalQLConfig(reward_scale=2.0, discount=0.9), False, None)
    assert store.config.data == DataSettings(0.9, 2.0)
    store.close()
