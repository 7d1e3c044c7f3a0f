"""The learned success classifier: its labels, training, held-out score, ONNX file (learner/success_classifier.py,
learner/classifier_cli.py) and the robot's judge that runs it with onnxruntime (robot/classifier_judge.py).

Data: o2o's pointmaze-umaze dataset (built here), and small replay stores written with the real store API:
"toy-reach" (state [progress, noise, done], a success once progress >= 0.9) and a camera one (a white
patch in the frame is the success)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import onnx
import pytest
import torch
from user_files_guard import minari_datasets_at

from o2o.datasets.classifier_format import ClassifierMismatch, HeldOutScore, OnnxClassifier
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import TransitionChunk
from o2o.envs import get_task
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.learner import classifier_cli
from o2o.learner.classifier_data import LabelError, LabelledObservations, from_dataset, from_store, split_by_episode
from o2o.learner.export_onnx import OnnxExportError
from o2o.learner.success_classifier import (ClassifierSettings, SuccessNet, TrainedClassifier, export_classifier,
                                            probabilities, threshold_for_precision, train_classifier)  # fmt: skip
from o2o.robot.classifier_judge import ClassifierJudge
from o2o.robot.seams import Verdict

POINTMAZE = "o2o/pointmaze-umaze/mixed-v0"
GOAL_RADIUS = 0.45  # PointMaze: success when the ball is within 0.45 of the goal (gymnasium-robotics maze_v4.py)
TOY = "toy-reach"
TOY_SPEC = ObsSpec(3)
CAMERA_SPEC = ObsSpec(1, (CameraSpec("front", 16, 16, 3),))
STEPS = 20  # per toy episode


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small nets on a shared 2-core machine: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pointmaze30(tmp_path_factory):
    """A Minari folder holding pointmaze-umaze's mixed dataset, 30 episodes (~2 s to build)."""
    from o2o.datasets.builders import build_dataset

    root = tmp_path_factory.mktemp("minari30")
    with minari_datasets_at(root):
        build_dataset("pointmaze-umaze", "mixed", n_episodes=30, progress=False)
    return root


def toy_episode(rng, success_at: float = 0.9, shuffle: np.random.Generator | None = None):
    """States [k / T, noise, done] for k = 0..T (done = 1 once k / T >= ``success_at``) and the success flag
    of each step (about the state it led to)."""
    states = np.zeros((STEPS + 1, 3), np.float32)
    states[:, 0] = np.arange(STEPS + 1) / STEPS
    states[:, 1] = rng.normal(size=STEPS + 1)
    states[:, 2] = states[:, 0] >= success_at
    success = states[1:, 2] == 1.0
    if shuffle is not None:  # the same number of successes, on random steps
        success = shuffle.permutation(success)
    return states, {}, success


def camera_episode(rng):
    """Frames of dark noise; the last 3 carry a white 6x6 patch (the success): T + 1 frames, T flags."""
    frames = rng.integers(0, 100, (STEPS + 1, 16, 16, 3), dtype=np.uint8)
    frames[-3:, 2:8, 2:8] = 255
    success = np.zeros(STEPS, bool)
    success[-3:] = True  # steps T-3..T-1 lead to frames T-2..T
    return np.zeros((STEPS + 1, 1), np.float32), {"front": frames}, success


def write_store(path, spec: ObsSpec, episodes, task: str = TOY) -> None:
    """Episodes of two actors, one chunk each, ending terminated: the real store, committed."""
    store = ReplayStore.create(path, spec, 1, task=task, fsync=False)
    for i, (states, frames, success) in enumerate(episodes):
        n = len(success)
        ends = np.zeros(n, np.uint8)
        ends[-1] = 1
        store.append(TransitionChunk(
            actor_id=f"actor-{i % 2}", seq=i // 2, policy_version=0, episode_id=i // 2, step=0, obs=states[:-1],
            action=np.zeros((n, 1), np.float32), reward=success.astype(np.float32), next_obs=states[1:],
            terminated=ends, truncated=np.zeros(n, np.uint8), success=success.astype(np.uint8), frames=frames,
        ))  # fmt: skip
    store.commit()
    store.close()


def toy_store(tmp_path, episodes: int = 10, **kwargs):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "store", TOY_SPEC, [toy_episode(rng, **kwargs) for _ in range(episodes)])
    return tmp_path / "store"


def hand_classifier(tmp_path, spec: ObsSpec = TOY_SPEC, task: str = TOY) -> str:
    """A classifier with weights set by hand: p = sigmoid(10 * state[0] - 5) (0.5 at progress 0.5), recorded
threshold 0.6."""
    model = SuccessNet(spec, hidden=())
    with torch.no_grad():
        model.head.weights[0].zero_()
        model.head.weights[0][0, 0] = 10.0
        model.head.biases[0].fill_(-5.0)
    score = HeldOutScore(0.6, tp=9, fp=1, fn=3, tn=87, episodes=4)
    trained = TrainedClassifier(model.eval(), score, spec, task, source="store:/nowhere", heldout_keys=np.array([1, 5]),
                                rows=600, train_episodes=16, train_positives=40, train_negatives=460, steps=0,
                                seconds=0.0)  # fmt: skip
    path = tmp_path / "hand.onnx"
    export_classifier(trained, path, exporter="torchscript")
    return str(path)


# ---------------------------------------------------------------- labels and the split


def test_labels_describe_the_observation_a_step_led_to(pointmaze30):
    with minari_datasets_at(pointmaze30):
        data = from_dataset(POINTMAZE, get_task("pointmaze-umaze"))
    # Flat pointmaze observation: achieved_goal (2), desired_goal (2), observation (4).
    distance = np.linalg.norm(data.state[:, 0:2] - data.state[:, 2:4], axis=1)
    np.testing.assert_array_equal(data.label, distance <= GOAL_RADIUS)
    # A success ends a pointmaze episode: one positive per successful episode, at its last step.
    assert data.episodes == 30 and 10 <= data.label.sum() <= 30
    last = np.r_[data.episode[1:] != data.episode[:-1], True]
    assert not (data.label & ~last).any()


def test_the_split_holds_out_whole_episodes_with_and_without_successes():
    episode = np.repeat(np.arange(10), 4)
    label = np.zeros(40, bool)
    label[[3, 7, 11, 15, 19]] = True  # episodes 0-4 succeed at their last step; 5-9 do not
    data = LabelledObservations(np.zeros((40, 1), np.float32), {}, label, episode, ObsSpec(1), "t", "s")
    for seed in range(10):
        train, held = split_by_episode(data, 0.2, seed=seed)
        assert len(held) == 2 and np.intersect1d(train, held).size == 0 and len(train) + len(held) == 10
        assert sum(k < 5 for k in held) == 1, held  # one episode with a success, one without
    np.testing.assert_array_equal(held, split_by_episode(data, 0.2, seed=9)[1])  # seeded
    for bad, message in [(dict(label=np.zeros(40, bool)), "no success label"),
                         (dict(label=np.ones(40, bool)), "failures too"),
                         (dict(episode=np.zeros(40, np.int64)), "at least 2")]:  # fmt: skip
        with pytest.raises(LabelError, match=message):
            split_by_episode(LabelledObservations(**{**data.__dict__, **bad}))


def test_heldout_score_and_threshold_match_a_hand_count():
    prob = np.array([0.9, 0.8, 0.4, 0.6, 0.1, np.nan])
    label = np.array([1, 0, 1, 1, 0, 1], bool)
    score = HeldOutScore.of(prob, label, 0.5, episodes=2)
    # Called a success: rows 0, 1, 3 (the NaN never is): tp rows 0, 3; fp row 1; fn rows 2, 5; tn row 4.
    assert (score.tp, score.fp, score.fn, score.tn) == (2, 1, 2, 1)
    assert score.precision == pytest.approx(2 / 3) and score.recall == pytest.approx(2 / 4)
    assert (score.positives, score.negatives) == (4, 2)
    # Precision by threshold, from the top: 0.9 -> 1/1, 0.8 -> 1/2, 0.6 -> 2/3, 0.4 -> 3/4, 0.1 -> 3/5.
    assert threshold_for_precision(prob, label, 0.99) == 0.9
    assert threshold_for_precision(prob, label, 0.7) == 0.4
    assert threshold_for_precision(np.array([0.7, 0.7]), np.array([True, False]), 0.9) is None  # ties stay together
    assert math.isnan(HeldOutScore.of(prob, np.zeros(6, bool), 0.95, 1).recall)  # no positive: n/a, not 0


# ---------------------------------------------------------------- training, scoring, export


def test_trains_on_pointmaze_and_the_onnx_file_matches_torch(pointmaze30, tmp_path):
    with minari_datasets_at(pointmaze30):
        data = from_dataset(POINTMAZE, get_task("pointmaze-umaze"))
    trained = train_classifier(data, ClassifierSettings(steps=400, batch_size=128), progress=False)
    held = data.take(np.isin(data.episode, trained.heldout_keys))
    score = trained.score
    assert score.episodes == 6 == len(np.unique(held.episode))  # 20 % of 30 episodes
    assert score.positives == int(held.label.sum()) >= 1 and score.positives + score.negatives == len(held)
    base_rate = score.positives / len(held)
    assert score.recall >= 0.5 and score.precision >= 10 * base_rate, score.describe()

    path = tmp_path / "classifier.onnx"
    assert export_classifier(trained, path) <= 1e-5  # the dynamo exporter, as o2o-export uses
    onnx_model = OnnxClassifier(path)
    np.testing.assert_allclose(onnx_model.probabilities(held.state, {}), probabilities(trained.model, held), atol=1e-5)
    meta = onnx_model.metadata
    assert meta["kind"] == "success_classifier" and meta["task"] == "pointmaze-umaze" and meta["obs_dim"] == "8"
    assert json.loads(meta["cameras"]) == {} and json.loads(meta["input_names"]) == ["obs"]
    assert float(meta["precision"]) == score.precision and int(meta["heldout_positives"]) == score.positives
    assert meta["trained_from"] == data.source and meta["trained_from"].endswith("mixed-v0/data")


def test_cli_trains_on_a_store_prints_the_score_and_check_repeats_it(tmp_path, capsys):
    store = toy_store(tmp_path)
    out = tmp_path / "toy.onnx"
    assert classifier_cli.main(["train", f"task={TOY}", f"store={store}", f"out={out}", "steps=300",
                                "batch_size=64", "exporter=torchscript"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    # 10 episodes of 20 steps, 3 successes each; 2 episodes held out: 6 positives, 34 negatives.
    assert "200 observations, 30 labelled successes, 10 episodes" in printed
    assert "precision 1.000, recall 1.000 at threshold 0.5 (tp 6, fp 0, fn 0, tn 34" in printed, printed
    assert classifier_cli.main(["check", str(out), f"store={store}"]) == 0
    printed = capsys.readouterr().out
    assert "on the episodes it held out" in printed and "(tp 6, fp 0, fn 0, tn 34" in printed, printed

    # Episodes stored since: check scores those too (all 10 new episodes, none trained on).
    more = tmp_path / "more"
    rng = np.random.default_rng(7)
    write_store(more, TOY_SPEC, [toy_episode(rng) for _ in range(4)])
    assert classifier_cli.main(["check", str(out), f"store={more}"]) == 0
    assert "every episode" in (printed := capsys.readouterr().out) and "12 positives, 68 negatives in 4" in printed


def test_a_mislabelled_store_scores_low(tmp_path):
    rng = np.random.default_rng(0)
    shuffle = np.random.default_rng(1)
    write_store(tmp_path / "store", TOY_SPEC, [toy_episode(rng, shuffle=shuffle) for _ in range(10)])
    data = from_store(tmp_path / "store", TOY)
    assert data.label.sum() == 30  # as many labels as the right store, on the wrong steps
    score = train_classifier(data, ClassifierSettings(steps=300, batch_size=64), progress=False).score
    assert score.positives == 6 and score.precision < 0.5, score.describe()  # the right labels score 1.0


def test_the_cli_refuses_data_it_cannot_train_on(tmp_path, capsys):
    def error(*words) -> str:
        assert classifier_cli.main(["train", *words, f"out={tmp_path / 'x.onnx'}", "steps=2"]) == 2
        return capsys.readouterr().err

    assert "holds task 'toy-reach', not 'other'" in error("task=other", f"store={toy_store(tmp_path)}")
    assert "no success label" in error(f"task={TOY}", f"store={toy_store(tmp_path / 'none', success_at=2.0)}")
    assert "at least 2" in error(f"task={TOY}", f"store={toy_store(tmp_path / 'one', episodes=1)}")
    assert "exactly one of store" in error(f"task={TOY}")
    assert "expected key=value" in error(f"task={TOY}", "stepz=3")
    assert not (tmp_path / "x.onnx").exists()


def test_export_refuses_nan_weights_and_keeps_the_old_file(tmp_path):
    path = hand_classifier(tmp_path)
    before = open(path, "rb").read()
    model = SuccessNet(TOY_SPEC, hidden=())
    with torch.no_grad():
        model.head.weights[0].fill_(math.nan)
    trained = TrainedClassifier(model.eval(), HeldOutScore(0.5, 1, 0, 0, 1, 2), TOY_SPEC, TOY, source="s",
                                heldout_keys=np.array([0]), rows=2, train_episodes=1, train_positives=1,
                                train_negatives=1, steps=1, seconds=0.0)  # fmt: skip
    with pytest.raises(OnnxExportError, match="non-finite"):
        export_classifier(trained, path, exporter="torchscript")
    assert open(path, "rb").read() == before


# ---------------------------------------------------------------- the judge


def test_judge_verdicts_on_hand_made_observations(tmp_path, caplog):
    path = hand_classifier(tmp_path)  # p = sigmoid(10 * progress - 5)
    with caplog.at_level("INFO", logger="o2o.robot.classifier_judge"):
        judge = ClassifierJudge(path, TOY_SPEC, TOY)
    assert "precision 0.900, recall 0.750 at threshold 0.6 on 4 held-out episodes" in caplog.text  # 9/10, 9/12
    judge.begin_episode()
    at = lambda progress: np.array([progress, 0.0, 0.0], np.float32)  # noqa: E731
    assert not judge.judge(at(0.2), {}).success  # p = sigmoid(-3) = 0.047
    verdict = judge.judge(at(0.8), {})  # p = sigmoid(3) = 0.953
    assert (verdict.reward, verdict.success, verdict.terminated, verdict.truncated) == (1.0, True, True, False)
    assert judge.last_prob == pytest.approx(1 / (1 + math.exp(-3)), abs=1e-6)
    # The file's threshold, 0.6: p = sigmoid(0.2) = 0.550 is no success, sigmoid(0.5) = 0.622 is one.
    assert not judge.judge(at(0.52), {}).success and judge.judge(at(0.55), {}).success

    strict = ClassifierJudge(path, TOY_SPEC, TOY, threshold=0.9, consecutive=2)
    verdicts = [strict.judge(at(p), {}).success for p in (0.8, 0.8, 0.3, 0.8, 0.8, 0.8)]  # p 0.95, 0.95, 0.12, ...
    assert verdicts == [False, True, False, False, True, True]
    strict.begin_episode()  # a new episode starts its run of successes afresh
    assert not strict.judge(at(0.8), {}).success

    nan_state = at(0.8)
    nan_state[1] = np.nan
    assert strict.judge(nan_state, {}) == Verdict() and strict.non_finite == 1  # no success, counted
    assert strict.judge(at(np.inf), {}) == Verdict() and strict.non_finite == 2  # p would be sigmoid(inf) = 1
    assert not strict.judge(at(0.8), {}).success  # the NaN broke the run: one step into a new one
    assert strict.judge(at(0.8), {}).success
    with pytest.raises(ValueError, match=r"state of shape \(2,\), expected \(3,\)"):
        judge.judge(np.zeros(2, np.float32), {})


def test_a_classifier_that_does_not_fit_the_robot_is_refused(tmp_path):
    path = hand_classifier(tmp_path)
    cases = [(ObsSpec(4), TOY, "state size 3 (robot: 4)"), (TOY_SPEC, "other", "task 'toy-reach' (robot: 'other')"),
             (ObsSpec(3, (CameraSpec("front", 16, 16, 3),)), TOY, "cameras [] (robot: ['front'])")]  # fmt: skip
    for spec, task, message in cases:
        with pytest.raises(ClassifierMismatch, match=re.escape(message)):
            ClassifierJudge(path, spec, task)
    camera = hand_classifier(tmp_path / "camera", CAMERA_SPEC)
    with pytest.raises(ClassifierMismatch, match=r"camera 'front' is \[16, 16, 3\] \(robot: \[32, 16, 3\]\)"):
        ClassifierJudge(camera, ObsSpec(1, (CameraSpec("front", 32, 16, 3),)), TOY)

    model = onnx.load(path)
    for key, value, message in [("kind", "policy", "kind is 'policy'"),
                                ("obs_dim", "4", r"graph input 'obs' is tensor\(float\) \['batch', 3\]")]:  # fmt: skip
        changed = tmp_path / f"{key}.onnx"
        onnx.helper.set_model_props(model, {**OnnxClassifier(path).metadata, key: value})
        onnx.save(model, changed)
        with pytest.raises(ClassifierMismatch, match=message):
            ClassifierJudge(changed, ObsSpec(int(value) if key == "obs_dim" else 3), TOY)
    with pytest.raises(ClassifierMismatch, match="cannot load"):
        ClassifierJudge(tmp_path / "missing.onnx", TOY_SPEC, TOY)


def test_a_nan_probability_is_never_a_success(tmp_path):
    path = hand_classifier(tmp_path)
    model = onnx.load(path)
    (weight,) = [w for w in model.graph.initializer if tuple(w.dims) == (3, 1)]  # the head's weights
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full((3, 1), np.nan, np.float32), weight.name))
    onnx.save(model, tmp_path / "nan.onnx")
    judge = ClassifierJudge(tmp_path / "nan.onnx", TOY_SPEC, TOY, threshold=1e-9)
    verdicts = [judge.judge(np.array([p, 0, 0], np.float32), {}) for p in (0.0, 1.0, 5.0)]
    assert verdicts == [Verdict()] * 3 and judge.non_finite == 3 and math.isnan(judge.last_prob)


def test_a_camera_classifier_from_a_store_judges_frames(tmp_path):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "store", CAMERA_SPEC, [camera_episode(rng) for _ in range(10)])
    data = from_store(tmp_path / "store", TOY)
    assert data.images["front"].shape == (200, 16, 16, 3)
    # Each row's image is its NEXT frame: the patch shows exactly on the rows labelled successes.
    np.testing.assert_array_equal(data.images["front"][:, 4, 4, 0] == 255, data.label)
    trained = train_classifier(data, ClassifierSettings(steps=150, batch_size=32), progress=False)
    assert (trained.score.precision, trained.score.recall) == (1.0, 1.0), trained.score.describe()
    path = tmp_path / "camera.onnx"
    export_classifier(trained, path)  # dynamo; parity checked against torch inside
    judge = ClassifierJudge(path, CAMERA_SPEC, TOY)
    with_patch, without = camera_episode(np.random.default_rng(5))[1]["front"][[-1, 0]]
    assert judge.judge(np.zeros(1, np.float32), {"front": with_patch}).success
    assert not judge.judge(np.zeros(1, np.float32), {"front": without}).success
    with pytest.raises(ValueError, match=r"camera 'front' gave uint8 \(16, 16\), expected uint8 \(16, 16, 3\)"):
        judge.judge(np.zeros(1, np.float32), {"front": without[..., 0]})
