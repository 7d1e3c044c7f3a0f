"""The ONNX success-classifier contract between its trainer and its users (no torch here).

``o2o-classifier train`` (learner/success_classifier.py) writes it; the robot's ``ClassifierJudge``
(robot/classifier_judge.py) and ``o2o-classifier check`` read it with onnxruntime.

Graph: inputs ``obs`` float32 [batch, obs_dim] (the raw state vector) and, for a task with cameras, one
uint8 [batch, H, W, C] input per camera after it, in the spec's (alphabetical) order: the names and
order of datasets/policy_format.py's policy inputs, without ``noise``. Output ``success_prob`` float32
[batch]: the probability that the observation shows the task done. Normalisation, image scaling and
the encoder are in the graph.

Metadata (strings): ``kind`` = ``"success_classifier"`` (a policy file is refused), ``task``,
``obs_dim``, ``cameras`` (JSON {name: [H, W, C]}), ``input_names`` / ``output_names`` (JSON), the
decision ``threshold``, and what it scored on its held-out episodes at that threshold
(``HeldOutScore.metadata``: ``precision``, ``recall``, ``heldout_positives``, ...), ``trained_from``
(``store:<path>`` or ``dataset:<path>``) and ``trained_rows`` (its observations then), ``heldout_episode_keys``
(JSON list: which episodes of that source it never trained on, so ``check`` can score it on them again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import numpy as np

from o2o.envs.obs_spec import ObsSpec

from .policy_format import input_mismatch, session_options

KIND = "success_classifier"
FORMAT_VERSION = "1"
OUTPUT_NAMES = ("success_prob",)
CLASSIFIER_FILENAME = "classifier.onnx"

log = logging.getLogger(__name__)


def input_names(cameras: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The graph's inputs: ``obs``, then one per camera (policy_format's names, no ``noise``)."""
    return ("obs", *cameras)


class ClassifierMismatch(ValueError):
    """A classifier file that does not fit this robot (its inputs, task or format); the message names both sides."""


@dataclasses.dataclass(frozen=True)
class HeldOutScore:
    """Confusion counts of a classifier on held-out observations at one threshold (p >= threshold: success)."""

    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int
    episodes: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.fp + self.tn

    @property
    def precision(self) -> float:
        """Of the observations called a success, the share that were one (NaN when none was called one)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        """Of the successes, the share called one (NaN when the held-out episodes hold no success)."""
        return self.tp / self.positives if self.positives else math.nan

    @classmethod
    def of(cls, prob: np.ndarray, label: np.ndarray, threshold: float, episodes: int) -> HeldOutScore:
        """Counts of ``prob >= threshold`` against ``label``; a NaN probability counts as "no success"."""
        called = np.nan_to_num(np.asarray(prob, np.float64), nan=-1.0) >= threshold
        label = np.asarray(label, bool)
        return cls(float(threshold), int(np.sum(called & label)), int(np.sum(called & ~label)),
                   int(np.sum(~called & label)), int(np.sum(~called & ~label)), int(episodes))  # fmt: skip

    def metadata(self) -> dict[str, str]:
        return {"threshold": repr(self.threshold), "precision": repr(self.precision), "recall": repr(self.recall),
                "heldout_positives": str(self.positives), "heldout_negatives": str(self.negatives),
                "heldout_episodes": str(self.episodes)}  # fmt: skip

    def describe(self) -> str:
        return (f"precision {_fmt(self.precision)}, recall {_fmt(self.recall)} at threshold {self.threshold:.6g} "
                f"(tp {self.tp}, fp {self.fp}, fn {self.fn}, tn {self.tn}; {self.positives} positives, "
                f"{self.negatives} negatives in {self.episodes} held-out episodes)")  # fmt: skip


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _float(meta: dict[str, str], key: str, source: str) -> float:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        raise ClassifierMismatch(f"{source}: metadata {key!r} is missing or not a number ({meta.get(key)!r})") from None


def _int(meta: dict[str, str], key: str, source: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise ClassifierMismatch(f"{source}: metadata {key!r} is missing or not an integer ({meta.get(key)!r})") from None


class OnnxClassifier:
    """A success classifier file in onnxruntime, its graph checked against its metadata on load.

    ``probabilities`` scores a batch; ``mismatch`` says what keeps it from a robot's observations."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        source = f"classifier {os.fspath(path)}"
        self.path = os.fspath(path)
        try:
            self.session = ort.InferenceSession(self.path, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types (NoSuchFile, InvalidProtobuf, ...)
            raise ClassifierMismatch(f"{source}: onnxruntime cannot load it: {err}") from None
        meta = self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("kind") != KIND:
            raise ClassifierMismatch(f"{source}: metadata kind is {meta.get('kind')!r}, not {KIND!r}: "
                                     "is it a policy? Train a classifier with `o2o-classifier train`")  # fmt: skip
        if meta.get("classifier_format_version") != FORMAT_VERSION:
            raise ClassifierMismatch(f"{source}: classifier_format_version {meta.get('classifier_format_version')!r}, "
                                     f"this code reads {FORMAT_VERSION!r}")  # fmt: skip
        try:
            cameras = json.loads(meta.get("cameras", "{}"))
            self.cameras = {str(k): tuple(int(d) for d in cameras[k]) for k in sorted(cameras)}
        except (ValueError, TypeError, AttributeError):
            raise ClassifierMismatch(f"{source}: metadata 'cameras' is {meta.get('cameras')!r}, expected JSON "
                                     "{name: [H, W, C]}") from None  # fmt: skip
        self.task = meta.get("task", "")
        self.obs_dim = _int(meta, "obs_dim", source)
        self.threshold = _float(meta, "threshold", source)
        self.precision = _float(meta, "precision", source)
        self.recall = _float(meta, "recall", source)
        self.heldout = {k: _int(meta, f"heldout_{k}", source) for k in ("positives", "negatives", "episodes")}
        self.trained_from = meta.get("trained_from", "")
        self.trained_rows = int(meta.get("trained_rows", "0") or 0)
        self.heldout_episode_keys = np.asarray(json.loads(meta.get("heldout_episode_keys", "[]")), np.int64)
        self.spec = ObsSpec.from_dict({"state_dim": self.obs_dim, "cameras": self.cameras})
        self._check_graph(source)

    def _check_graph(self, source: str) -> None:
        """The graph's inputs and output are the ones its metadata declares (names, types, sizes)."""
        expected = {"obs": ("tensor(float)", (self.obs_dim,)),
                    **{name: ("tensor(uint8)", shape) for name, shape in self.cameras.items()}}  # fmt: skip
        got = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if got != (list(expected), list(OUTPUT_NAMES)):
            raise ClassifierMismatch(f"{source}: graph has inputs {got[0]} / outputs {got[1]}, its metadata declares "
                                     f"{list(expected)} / {list(OUTPUT_NAMES)}")  # fmt: skip
        why = input_mismatch(self.session, expected)
        if why is not None:
            raise ClassifierMismatch(f"{source}: {why}")

    def mismatch(self, spec: ObsSpec, task: str) -> list[str]:
        """What differs between this classifier and a robot's observations and task, each with both sides."""
        wrong = []
        if self.task != task:
            wrong.append(f"task {self.task!r} (robot: {task!r})")
        if self.obs_dim != spec.state_dim:
            wrong.append(f"state size {self.obs_dim} (robot: {spec.state_dim})")
        robot = {c.name: c.shape for c in spec.cameras}
        if list(self.cameras) != list(robot):
            wrong.append(f"cameras {list(self.cameras)} (robot: {list(robot)})")
        else:
            wrong += [f"camera {name!r} is {list(shape)} (robot: {list(robot[name])})"
                      for name, shape in self.cameras.items() if shape != robot[name]]  # fmt: skip
        return wrong

    def check_fits(self, spec: ObsSpec, task: str) -> None:
        """Raise ``ClassifierMismatch`` naming every difference from the robot's observations and task."""
        wrong = self.mismatch(spec, task)
        if wrong:
            raise ClassifierMismatch(f"classifier {self.path} does not fit this robot: " + "; ".join(wrong))

    def probabilities(self, state: np.ndarray, images: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
        """(N,) float32 success probabilities of N observations (state (N, obs_dim), images {camera: (N, H, W, C)})."""
        state = np.asarray(state, np.float32)
        out = np.empty(len(state), np.float32)
        for start in range(0, len(state), batch):
            rows = slice(start, start + batch)
            feed = {"obs": np.ascontiguousarray(state[rows]),
                    **{name: np.ascontiguousarray(images[name][rows]) for name in self.cameras}}  # fmt: skip
            out[rows] = self.session.run(OUTPUT_NAMES, feed)[0]
        return out

    def describe(self) -> str:
        """Its held-out score, as recorded when it was trained."""
        return (f"precision {_fmt(self.precision)}, recall {_fmt(self.recall)} at threshold {self.threshold:.6g} "
                f"on {self.heldout['episodes']} held-out episodes ({self.heldout['positives']} positives, "
                f"{self.heldout['negatives']} negatives) of {self.trained_from}")
