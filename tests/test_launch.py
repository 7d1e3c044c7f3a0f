"""`o2o-launch` end to end on a tiny budget: the README's main job, shrunk.

Builds the dataset, pretrains, then runs the real learner with 2 real actor
processes on loopback; the run folder holds what the README promises.
"""

import json
import os
import subprocess
import sys

import numpy as np

from o2o.datasets.replay_store import ReplayStore

LEARNER = ["build_episodes=6", "batch_size=32", "warmup_rows=100", "publish_every=20", "checkpoint_every=20",
           "log_every=10", "eval.episodes=1"]  # fmt: skip


def test_launch_pretrains_then_fine_tunes_with_two_actors(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "o2o.learner.launch", "pretrain_steps=40", "online_updates=60", "actors=2",
        "refresh_s=0.5", f"learner_overrides={json.dumps(LEARNER)}",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 60 online updates" in done.stdout
    assert "pretraining" in done.stderr and "online updates" in done.stderr  # both progress bars were shown

    for name in ("checkpoint.pt", "policy.onnx", "pretrain/checkpoint.pt", "pretrain/policy.onnx", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    store = ReplayStore.open(run_dir / "replay", "r")
    data = store.read(columns=["actor", "policy_version"])
    assert sorted(store.actor_ids) == ["actor-0", "actor-1"]
    assert set(np.unique(data["actor"])) == {0, 1}  # both actors' transitions were committed
    assert data["policy_version"].min() >= 0  # acted with the pretrained policy or a newer one
    online = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in online if "train/critic_loss" in r) == 60
