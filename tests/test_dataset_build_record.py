"""An o2o dataset records how it was built (Minari metadata), and a run refuses one built with other
parameters, saying what it found, what it wanted and the command that rebuilds it."""

import os
import subprocess
import sys

import minari
import pytest

from o2o.datasets.builders import BUILD_METADATA_KEY, BuildRecord, build_dataset, ensure_dataset, recorded_build
from o2o.datasets.builders.common import record_episode
from o2o.datasets.minari_io import DatasetError, load_transitions, write_dataset
from o2o.envs import get_task, make_env
from user_files_guard import minari_datasets_at

DATASET = "o2o/pointmaze-umaze/mixed-v0"
TASK = "pointmaze-umaze"


@pytest.fixture
def minari_root(tmp_path):
    with minari_datasets_at(tmp_path / "minari") as root:
        yield root


def test_a_built_dataset_records_its_parameters_in_its_minari_metadata(minari_root):
    build_dataset(TASK, "mixed", 3, seed=5, progress=False)
    loaded = minari.load_dataset(DATASET)  # as any later run reads it
    assert loaded.storage.metadata[BUILD_METADATA_KEY] == {
        "task": TASK, "quality": "mixed", "episodes": 3, "seed": 5, "builder_version": 1}  # fmt: skip
    assert recorded_build(loaded) == BuildRecord(TASK, "mixed", 3, 5)
    assert loaded.total_episodes == 3


def test_a_dataset_built_with_fewer_episodes_is_refused_with_the_rebuild_command(minari_root):
    build_dataset(TASK, "mixed", 3, progress=False)
    with pytest.raises(DatasetError) as err:
        ensure_dataset(DATASET, episodes=5, progress=False)
    message = str(err.value)
    assert "holds 3 episodes, seed 0" in message and "wants 5 episodes, seed 0" in message
    assert "o2o-dataset build --task pointmaze-umaze --quality mixed --episodes 5 --seed 0" in message
    assert "rebuild_dataset=true" in message
    assert minari.load_dataset(DATASET).total_episodes == 3  # refused, not touched


def test_another_seed_is_refused_too(minari_root):
    build_dataset(TASK, "mixed", 3, seed=0, progress=False)
    with pytest.raises(DatasetError, match="seed 0.*wants 3 episodes, seed 1"):
        ensure_dataset(DATASET, episodes=3, seed=1, progress=False)


def test_rebuild_replaces_a_mismatched_dataset_and_a_matching_one_is_kept(minari_root):
    build_dataset(TASK, "mixed", 3, progress=False)
    ensure_dataset(DATASET, episodes=4, rebuild=True, progress=False)
    assert minari.load_dataset(DATASET).total_episodes == 4
    metadata = minari_root / DATASET / "data" / "metadata.json"
    written = metadata.stat().st_mtime_ns
    ensure_dataset(DATASET, episodes=4, progress=False)  # what it holds: used as it is
    assert metadata.stat().st_mtime_ns == written


def test_a_missing_dataset_is_built_with_the_tasks_default_size_unless_told(minari_root):
    ensure_dataset(DATASET, episodes=2, progress=False)
    assert recorded_build(minari.load_dataset(DATASET)) == BuildRecord(TASK, "mixed", 2, 0)
    with pytest.raises(DatasetError, match="not found"):
        ensure_dataset("o2o/pointmaze-umaze/expert-v0", episodes=2, build_missing=False)


def test_an_o2o_id_with_no_build_record_is_refused(minari_root):
    env = make_env(TASK, flatten=False)
    write_dataset(DATASET, env, [record_episode(env, lambda o, e, r: e.action_space.sample(), 0)],
                  algorithm_name="by hand", description="no record")  # fmt: skip
    with pytest.raises(DatasetError, match="no build record"):
        ensure_dataset(DATASET, episodes=1, progress=False)


def test_a_users_own_dataset_under_another_id_is_used_as_it_is(minari_root):
    env = make_env(TASK, flatten=False)
    write_dataset("me/umaze/mine-v0", env, [record_episode(env, lambda o, e, r: e.action_space.sample(), 0)],
                  algorithm_name="mine", description="a user's dataset")  # fmt: skip
    ensure_dataset("me/umaze/mine-v0", episodes=300)  # not ours: nothing to check, nothing built
    assert len(load_transitions("me/umaze/mine-v0", get_task(TASK))) > 0
    assert not (minari_root / "o2o").exists()


def test_o2o_pretrain_refuses_a_6_episode_dataset_when_it_wants_300(private_minari, tmp_path):
    """The leak's consequence: a leftover 6-episode dataset under the default id. The real command stops
    before training, with what it found, what it wanted and how to rebuild."""
    cmd = [sys.executable, "-m", "o2o.learner.pretrain", f"task={TASK}", "build_episodes=300", "steps=5",
           "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MINARI_DATASETS_PATH": str(private_minari)})  # fmt: skip
    assert done.returncode != 0
    assert "holds 6 episodes" in done.stderr and "wants 300 episodes" in done.stderr, done.stderr[-2000:]
    assert "o2o-dataset build --task pointmaze-umaze --quality mixed --episodes 300 --seed 0" in done.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_o2o_launch_refuses_it_before_starting_anything(private_minari, tmp_path):
    cmd = [sys.executable, "-m", "o2o.launch.launch", f"hydra.run.dir={tmp_path / 'run'}"]  # default: 300 episodes
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MINARI_DATASETS_PATH": str(private_minari)})  # fmt: skip
    assert done.returncode == 2
    assert "o2o-launch: error: dataset o2o/pointmaze-umaze/mixed-v0 holds 6 episodes" in done.stderr
    assert not (tmp_path / "run" / "learner.log").exists()  # no learner, no actors
