"""A learned success classifier as the robot's judge (HIL-SERL's reward classifier), run with onnxruntime.

The file comes from ``o2o-classifier train`` (format: datasets/classifier_format.py). On load it is checked
against the robot: a classifier for another task, another state size or other cameras (names or shapes) is
refused with a ``ClassifierMismatch`` naming both sides, before it judges a single step. Its held-out
precision and recall (recorded when it was trained) are logged then, so the operator sees how far to trust
it before it is used.

Verdicts: success (reward 1, terminated) once ``p >= threshold`` for ``consecutive`` steps in a row, as
HIL-SERL's ``MultiCameraBinaryRewardClassifierWrapper`` ends the episode on the classifier's success
(franka_env/envs/wrappers.py; its configs threshold ``sigmoid(logit)`` at 0.7 to 0.95). A probability that
is not a number, or an observation whose state is not finite, is never a success: it is counted
(``non_finite``), breaks the run of successes and is logged (the 1st, 10th, 100th... time).
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from o2o.datasets.classifier_format import ClassifierMismatch, OnnxClassifier
from o2o.envs.obs_spec import ObservationError, ObsSpec

from .seams import Verdict

__all__ = ["ClassifierJudge", "ClassifierMismatch"]
log = logging.getLogger(__name__)

NO_SUCCESS = Verdict()
SUCCESS = Verdict(reward=1.0, success=True, terminated=True)


class ClassifierJudge:
    """``Judge`` (robot/seams.py) from an ONNX success classifier; ``threshold`` None: the file's own."""

    def __init__(self, path: str | os.PathLike, spec: ObsSpec, task: str, threshold: float | None = None,
                 consecutive: int = 1, threads: int = 1):  # fmt: skip
        self.classifier = OnnxClassifier(path, threads)
        self.classifier.check_fits(spec, task)
        self.threshold = self.classifier.threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"classifier threshold must be in (0, 1], got {self.threshold}")
        if consecutive < 1:
            raise ValueError(f"consecutive must be >= 1 (steps in a row at p >= threshold), got {consecutive}")
        self.consecutive = int(consecutive)
        self.spec = spec
        self.streak = 0
        self.last_prob = math.nan
        self.non_finite = 0
        """Steps whose probability (or state) was not finite: judged "no success"."""
        self._state = np.zeros((1, spec.state_dim), np.float32)
        self._images = {c.name: np.zeros((1, *c.shape), np.uint8) for c in spec.cameras}
        log.info("success classifier %s (task %s): held-out %s; judging at threshold %.6g, %d step(s) in a row",
                 path, task, self.classifier.describe(), self.threshold, self.consecutive)  # fmt: skip

    def begin_episode(self) -> None:
        self.streak = 0
        self.last_prob = math.nan

    def judge(self, state: np.ndarray, images: dict[str, np.ndarray]) -> Verdict:
        """The verdict on the observation the last action led to."""
        state = np.asarray(state)
        if state.shape != (self.spec.state_dim,):
            raise ObservationError(f"classifier judge: state of shape {state.shape}, expected ({self.spec.state_dim},)")
        self._state[0] = state
        for camera in self.spec.cameras:
            image = images.get(camera.name)
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != camera.shape:
                got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else repr(type(image).__name__)
                raise ObservationError(f"classifier judge: camera {camera.name!r} gave {got}, expected uint8 {camera.shape}")
            self._images[camera.name][0] = image
        prob = float(self.classifier.probabilities(self._state, self._images)[0]) if np.isfinite(state).all() else math.nan
        self.last_prob = prob
        if not math.isfinite(prob):  # NaN >= threshold is False anyway; counted so that it is seen
            self.non_finite += 1
            self.streak = 0
            if math.log10(self.non_finite).is_integer():
                log.warning("success classifier: %d step(s) judged without a finite probability (NaN state or "
                            "weights?): never a success", self.non_finite)  # fmt: skip
            return NO_SUCCESS
        self.streak = self.streak + 1 if prob >= self.threshold else 0
        return SUCCESS if self.streak >= self.consecutive else NO_SUCCESS
