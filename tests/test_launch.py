"""`o2o-launch` end to end on a tiny budget: the README's main job, shrunk; and how its nested
`learner.*` / `actor.*` settings reach the real o2o-learner and o2o-actor processes.

The end-to-end runs build the dataset, (pre)train, then run the real learner with real actor
processes on loopback; the run folder holds what the README promises.
"""

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

import o2o.actor.main  # noqa: F401  (registers actor_schema)
import o2o.learner.online  # noqa: F401  (registers online_schema)
from o2o.actor.config import ActorConfig
from o2o.datasets.replay_store import ReplayStore
from o2o.learner.config import CalQLConfig, NetworkConfig, OnlineConfig
from o2o.learner.commands import run_logged, start_logged
from o2o.learner.fine_tuning import explicit_keys
from o2o.launch.commands import actor_command, flatten, hydra_value, learner_command
from o2o.launch.config import GROUPS, LaunchConfig, hydra_overrides
from test_pretrain_cli import finish

# One torch thread: the learner shares 2 cores with the launcher and the actors (more threads thrash).
LEARNER = ["learner.build_episodes=6", "learner.batch_size=32", "learner.warmup_rows=100", "learner.publish_every=20",
           "learner.checkpoint_every=20", "learner.log_every=10", "learner.eval.episodes=1",
           "learner.threads=1"]  # fmt: skip
# The launcher stops the actors after the learner: no acks can come then, so they need not wait for any.
ACTOR = ["actor.link.drain_s=0"]


def launch(tmp_path: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "o2o.launch.launch", "refresh_s=0.5", *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_launch_pretrains_then_fine_tunes_with_two_actors(tmp_path):
    run_dir = tmp_path / "run"
    # 50-step episodes: rows become trainable (their episode ended) within a second of acting.
    done = launch(tmp_path, run_dir, "learner.steps=40", "learner.online_updates=60", "actors=2", *LEARNER, *ACTOR,
                  "actor.max_episode_steps=50")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: 60 online updates" in done.stdout
    assert "pretraining" in done.stderr and "online updates" in done.stderr  # both progress bars were shown
    assert "building dataset pointmaze-umaze/mixed" in done.stderr  # the build's own bar, not a 0% pretraining one
    # What online fine-tuning starts from, said when it starts, with integers as integers.
    assert "offline policy, where online fine-tuning starts (online step 0): score" in done.stdout
    assert "over 1 deterministic episodes" in done.stdout
    assert "evaluation over the same 1 deterministic episodes: start (online step 0)" in done.stdout

    for name in ("checkpoint.pt", "policy.onnx", "pretrain/checkpoint.pt", "pretrain/policy.onnx", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    store = ReplayStore.open(run_dir / "replay", "r")
    data = store.read(columns=["actor", "policy_version"])
    assert sorted(store.actor_ids) == ["actor-0", "actor-1"]
    assert set(np.unique(data["actor"])) == {0, 1}  # both actors' transitions were committed
    assert data["policy_version"].min() >= 0  # acted with the pretrained policy or a newer one
    online = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in online if "train/critic_loss" in r) == 60


def tiny_checkpoint(folder: Path) -> Path:
    from o2o.learner.checkpoint import AgentSpec, save_checkpoint

    net = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32])
    spec = AgentSpec("pointmaze-umaze", 8, 2, [-1.0, -1.0], [1.0, 1.0], dataclasses.asdict(CalQLConfig()),
                     dataclasses.asdict(net))  # fmt: skip
    return save_checkpoint(folder / "checkpoint.pt", spec.build_agent(), spec, step=0)


def test_nested_overrides_reach_the_real_learner_and_actor(tmp_path, private_minari):
    # private_minari: the offline dataset is already in tmp_path/minari (launch()'s), not built again.
    run_dir, stats = tmp_path / "run", tmp_path / "actor stats.json"
    learner = [f"pretrained={tiny_checkpoint(tmp_path / 'pre')}", "online_updates=30", "warmup_rows=40",
               "publish_every=7", "algo.cql_alpha=1.0", "build_episodes=6", "batch_size=32", "eval.episodes=1",
               "threads=1"]  # fmt: skip
    actor = ["actor_id=robot", "max_episode_steps=20", "control_hz=100", f"stats_file='{stats}'", "link.drain_s=0"]
    done = launch(tmp_path, run_dir, "actors=1", *(f"learner.{a}" for a in learner), *(f"actor.{a}" for a in actor))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The learner composed them into its own config (Hydra saves it in its run folder; the launcher's
    # goes to .hydra/launch) ...
    assert (run_dir / ".hydra" / "launch" / "config.yaml").is_file()
    learner_cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert learner_cfg["publish_every"] == 7 and learner_cfg["algo"]["cql_alpha"] == 1.0
    assert learner_cfg["max_rows_ahead"] == 500  # launch.yaml's own default reached it too
    # ... and applied the explicit algo override to the checkpoint's settings (fine_tuning.py).
    assert "changed for fine-tuning: algo.cql_alpha 5.0 -> 1.0" in (run_dir / "learner.log").read_text()
    # The actor acted with its settings: its name, its time limit, its stats file (a path with a space).
    store = ReplayStore.open(run_dir / "replay", "r")
    assert store.actor_ids == ["robot-0"]
    assert store.episodes(["length"])["length"].max() <= 20
    assert json.loads(stats.read_text())["actor"]["steps"] > 0
    assert "control_hz=100.0" in (run_dir / "actor-0.log").read_text().splitlines()[0]  # its command line


def test_a_setting_is_declared_once():
    own = {f.name for f in dataclasses.fields(LaunchConfig)} - {"learner", "actor"}  # the two nested configs
    assert own == {"actors", "port", "refresh_s"}
    # robot.* are the robot's own (LeRobot's) config keys, not o2o settings: robot.port is a serial port.
    nested = {key.split(".")[-1] for key in {**flatten(OnlineConfig()), **flatten(ActorConfig())}
              if not key.startswith("robot.")}  # fmt: skip
    assert not own & nested  # no launcher field copies a learner's or an actor's
    assert "dataset" not in {f.name for f in dataclasses.fields(ActorConfig)}


def composed(*args: str):
    """The launch config, the learner's group choices and the explicit keys, as o2o-launch sees them."""
    with initialize_config_module("o2o.configs", version_base=None):
        cfg = compose("launch", overrides=hydra_overrides(list(args)), return_hydra_config=True)
    hydra_cfg = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    groups = {group: hydra_cfg.runtime.choices[f"{group}@learner"] for group in GROUPS}
    return OmegaConf.to_object(cfg), groups, explicit_keys(hydra_cfg.overrides.task)


def compose_command(name: str, args: list[str]):
    with initialize_config_module("o2o.configs", version_base=None):
        return OmegaConf.to_object(compose(name, overrides=args))


def test_the_learner_and_actors_compose_the_launch_settings(tmp_path):
    cfg, groups, explicit = composed("task=pusher", "preset=paper", "learner.utd=0.5", "learner.algo.cql_alpha=1.0",
                                     "learner.eval.every=300", "actor.policy.noise_scale=0.5", "actors=3",
                                     "+actor.env_kwargs={frame_skip: 2}")  # fmt: skip
    assert groups == {"task": "pusher", "preset": "paper"}
    assert cfg.learner.dataset == "o2o/pusher/mixed-v0" and cfg.actor.task == "pusher"  # one task= for all
    assert cfg.learner.algo.mc_infinite_horizon and cfg.learner.steps == 500_000  # paper's Kitchen column: the preset's budget wins

    args = learner_command(cfg, groups, explicit, tmp_path / "run dir", "tcp://127.0.0.1:5000")[3:]
    assert args[:2] == ["task=pusher", "preset=paper"]
    # algo/net only when given (fine-tuning takes the rest from the checkpoint), not the preset's.
    assert [a for a in args if a.startswith(("algo.", "net."))] == ["algo.cql_alpha=1.0"]
    learner = compose_command("learner", [a for a in args if not a.startswith("hydra.")])
    expected = dataclasses.replace(cfg.learner, endpoint="tcp://127.0.0.1:5000", progress=False)
    assert learner == expected  # the learner runs exactly what o2o-launch shows (--cfg job)
    assert OverridesParser.create().parse_override(args[-1]).value() == str(tmp_path / "run dir")  # hydra.run.dir

    args = actor_command(cfg, explicit, tmp_path, "tcp://127.0.0.1:5000", 2)[3:]
    actor = compose_command("actor", args)
    expected = dataclasses.replace(cfg.actor, actor_id="actor-2", seed=2, learner="tcp://127.0.0.1:5000",
                                   spool=dataclasses.replace(cfg.actor.spool, dir=str(tmp_path / "spool")))  # fmt: skip
    assert actor == expected
    assert actor.control_hz == 50 and actor.policy.noise_scale == 0.5 and actor.env_kwargs == {"frame_skip": 2}


def test_a_key_set_equal_to_the_schema_default_still_overrides_the_preset(tmp_path):
    cfg, groups, explicit = composed("learner.steps=20000", "learner.net.normalize_observations=false")
    args = learner_command(cfg, groups, explicit, tmp_path, "tcp://127.0.0.1:5000")
    assert "steps=20000" in args and "net.normalize_observations=false" in args  # preset small sets 5000 / true


@pytest.mark.parametrize("value", [None, True, 3, -1e30, 0.5, "pusher", "/a b/c", "it's", "C:\\dir\\", "x=y", "1",
                                   "null", "", [256, 256], [0.5, None, "a,b"], {"k": "v w", "n": 1}])  # fmt: skip
def test_hydra_value_reads_back_as_the_same_value(value):
    assert OverridesParser.create().parse_override(f"key={hydra_value(value)}").value() == value


REFUSED = [
    (["learner.utdd=0.5"], "utdd"),
    (["task=pointmaze-umazee"], "pointmaze-umaze"),
    (["learner.task=pusher"], "task=NAME"),
    (["actor.learner=tcp://x:1"], "port="),
    (["actor.policy.swap=never"], "policy.swap"),
]  # fmt: skip


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> list[tuple[Path, int, str]]:
    """(run folder, exit status, stderr) of o2o-launch with each REFUSED command line; the launchers
    run side by side (each spends its time starting up)."""
    root = tmp_path_factory.mktemp("refused")
    started = []
    for i, (args, _) in enumerate(REFUSED):
        run_dir = root / str(i) / "run"
        cmd = [sys.executable, "-m", "o2o.launch.launch", "refresh_s=0.5", *args, f"hydra.run.dir={run_dir}"]
        env = {**os.environ, "MINARI_DATASETS_PATH": str(root / str(i) / "minari")}
        started.append((run_dir, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                  env=env)))  # fmt: skip
    results = []
    for run_dir, proc in started:
        done = finish(proc)
        results.append((run_dir, done.returncode, done.stderr))
    return results


@pytest.mark.parametrize("case", range(len(REFUSED)), ids=[message for _, message in REFUSED])
def test_typos_and_settings_the_launcher_owns_are_clear_errors(refused, case):
    run_dir, returncode, stderr = refused[case]
    message = REFUSED[case][1]
    assert returncode != 0 and message in stderr, stderr[-2000:]
    assert not (run_dir / "learner.log").exists()  # refused before anything started


def test_a_started_command_logs_itself_quoted_then_its_output(tmp_path):
    """The first line of a process's log is its command, quoted so it can be pasted back into a shell."""
    cmd = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    assert start_logged(cmd, tmp_path / "a" / "started.log").wait() == 3
    assert run_logged(cmd, tmp_path / "run.log", stdin=subprocess.DEVNULL) == 3
    for log in (tmp_path / "a" / "started.log", tmp_path / "run.log"):
        first, *rest = log.read_text().splitlines()
        assert shlex.split(first) == cmd  # a plain " ".join would split the -c program apart
        assert sorted(rest) == ["err", "out"]

