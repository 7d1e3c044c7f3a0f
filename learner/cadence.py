"""When the training loops log, evaluate, publish and checkpoint, and the log and evaluation steps themselves.

Both loops (``offline.train``: pretraining and OOO retraining; ``online.run_online``) use these:
one ``Cadence`` per periodic job, ``log_train`` for the averaged metrics, ``Evaluations`` for the
policy on the task's fixed evaluation episodes.
"""

from __future__ import annotations

import logging

import numpy as np

from o2o.envs import TaskSpec

from .config import EvalConfig
from .divergence import check_losses
from .evaluation import evaluate, not_evaluated
from .metric_keys import EPISODES, EVAL, ONLINE_STEPS, TRAIN
from .metrics import MetricsLogger, RunningMean

log = logging.getLogger("o2o.learner")


class Cadence:
    """When a periodic job is due: every ``every`` counts of a counter (0: never), and at ``last``.

    ``aligned``: at multiples of ``every`` (update counts, which step by one: a resumed run keeps its
    rhythm); otherwise ``every`` after the count it last ran at (committed rows, which jump)."""

    def __init__(self, every: int, start: int = 0, aligned: bool = True, last: int | None = None):
        self.every, self.aligned, self.last = every, aligned, last
        self.next = self._after(start)

    def _after(self, count: int) -> int | None:
        if self.every <= 0:
            return None
        return (count // self.every + 1) * self.every if self.aligned else count + self.every

    def due(self, count: int) -> bool:
        """Is the job due at ``count``? Each time it is, the next one is scheduled."""
        if self.next is not None and count >= self.next:
            self.next = self._after(count)
            return True
        return count == self.last

    def left(self, count: int) -> int:
        """Counts until the job is next due (``every > 0`` only)."""
        return self.next - count


def log_train(logger: MetricsLogger, running: RunningMean, step: int, extra: dict | None = None) -> dict:
    """The metrics averaged since the last log (plus ``extra``), logged as train/...; stops a
    diverged run (``check_losses``). Returns the logged record."""
    shown = logger.log(step, TRAIN, {**running.pop(), **(extra or {})})
    check_losses(shown, step)
    return shown


class Evaluations:
    """The policy on the same deterministic episodes every time (``eval.seed`` + i), logged as eval/..."""

    def __init__(self, agent, task: TaskSpec, cfg: EvalConfig, low: np.ndarray, high: np.ndarray,
                 logger: MetricsLogger):  # fmt: skip
        self.agent, self.task, self.cfg, self.low, self.high, self.logger = agent, task, cfg, low, high, logger
        self.results: list[dict] = []
        self.at: int | None = None  # the step of the last evaluation (None: the agent changed since)
        self.skipped = not_evaluated(task)  # a real-world task: no simulator to evaluate in

    def run(self, step: int, online_steps: int | None = None) -> dict | None:
        """Evaluate the policy as it is now, log it at ``step``, keep it. ``online_steps``: the committed
        online rows (an online run's evaluation records them and its episode count). None (said once in
        the log): a real-world task, whose evaluation is its actors' episodes."""
        if self.skipped:
            if self.skipped is not True:
                log.info("%s", self.skipped)
                self.skipped = True
            return None
        result = evaluate(self.agent, self.task, self.cfg.episodes, self.cfg.seed, self.low, self.high)
        if online_steps is not None:
            result = {**result, ONLINE_STEPS: online_steps, EPISODES: self.cfg.episodes}
        self.logger.log(step, EVAL, result)
        self.results.append(result)
        self.at = step
        return result

    def current(self, step: int, online_steps: int | None = None) -> dict:
        """The policy at ``step``: the evaluation already made at this step, if there is one."""
        if self.at == step and self.results:
            return self.results[-1]
        return self.run(step, online_steps)

    def agent_changed(self) -> None:
        """The agent changed without a step (a retrain switched in): the next ``current`` evaluates anew."""
        self.at = None
