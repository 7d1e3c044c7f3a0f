"""`o2o-pretrain` end to end on a tiny budget: dataset built, checkpoint, metrics, policy.onnx, resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

TINY = [
    "task=pointmaze-umaze",
    "build_episodes=6",
    "log_every=10",
    "eval.every=20",
    "eval.episodes=1",
    "checkpoint_every=20",
    "net.policy_hidden=[32,32]",
    "net.critic_hidden=[32,32]",
    "batch_size=32",
    "progress=false",
    "threads=1",  # two runs share the 2 cores below; one thread each, the same in every run (exact resume)
]


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "o2o.learner.pretrain", *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def side_by_side(*runs: tuple[Path, tuple[str, ...]]) -> list[subprocess.CompletedProcess]:
    """``o2o-pretrain`` in each (run folder, overrides), all at once (each spends seconds starting up)."""
    procs = [start(run_dir, *overrides) for run_dir, overrides in runs]
    return [finish(proc) for proc in procs]


def pretrain(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return side_by_side((run_dir, overrides))[0]


def assert_ok(*results: subprocess.CompletedProcess) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    straight, first_half, resumed = root / "straight", root / "half", root / "resumed"
    # The first run builds the dataset (if no earlier test did); the two others then run side by side.
    assert_ok(pretrain(first_half, "steps=20"))
    # `resume` continues a run in its own folder: resume a copy, so first_half stays at step 20.
    shutil.copytree(first_half, resumed)
    assert_ok(*side_by_side((straight, ("steps=40",)), (resumed, ("steps=40", f"resume={resumed}"))))
    return straight, first_half, resumed


def test_run_folder_holds_checkpoint_metrics_tensorboard_and_policy(runs):
    straight, _, _ = runs
    ckpt = weights(straight)
    assert ckpt["step"] == 40
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/critic_loss" in line]
    evals = [line for line in lines if "eval/return" in line]
    assert [line["step"] for line in train] == [10, 20, 30, 40]
    assert {"train/bound_rate", "train/q_data", "train/mc_return", "train/alpha", "train/cql_gap"} <= set(train[0])
    assert all(np.isfinite(v) for line in train for k, v in line.items() if k.startswith("train/"))
    assert [line["step"] for line in evals] == [20, 40]
    assert {"eval/success", "eval/normalized_score"} <= set(evals[0])
    assert list((straight / "tb").glob("events.out.tfevents.*"))

    session = ort.InferenceSession(str(straight / "policy.onnx"), providers=["CPUExecutionProvider"])
    obs = np.zeros((3, 8), np.float32)
    action = session.run(["action"], {"obs": obs, "noise": np.zeros((3, 2), np.float32)})[0]
    assert action.shape == (3, 2) and np.all(np.abs(action) <= 1.0)


def test_resume_continues_exactly(runs):
    straight, first_half, resumed = runs
    assert weights(first_half)["step"] == 20
    a, b = weights(straight), weights(resumed)
    assert b["step"] == 40
    for key, value in a["agent"].items():
        assert torch.equal(value, b["agent"][key]), key


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> list[subprocess.CompletedProcess]:
    """The command lines o2o-pretrain must refuse, run side by side."""
    root = tmp_path_factory.mktemp("refused")
    return side_by_side((root / "a", ("task=pointmaze-umazee",)), (root / "b", ("algo.cql_alpah=1.0",)),
                        (root / "c", ("dataset=someone/missing-v0", "steps=5")))  # fmt: skip


def test_unknown_task_and_bad_override_are_clear_errors(refused):
    result = refused[0]
    assert result.returncode != 0 and "pointmaze-umaze" in result.stderr
    result = refused[1]
    assert result.returncode != 0 and "cql_alpah" in result.stderr


def test_missing_dataset_is_a_clear_error(refused):
    result = refused[2]
    assert result.returncode == 2
    assert "not found" in result.stderr and "MINARI_DATASETS_PATH" in result.stderr
