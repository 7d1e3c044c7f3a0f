"""OOO's bound on the exploring agent's Q' (and the retrain's): [min r, max r] / (1 - gamma) over the
rewards trained on so far, widened as online rewards arrive."""

from __future__ import annotations

import numpy as np


class QBound:
    """OOO's exploring agent's Q' bound, [min r, max r] / (1 - gamma) over the offline rewards and
    every online reward so far: OOO_for_calql/conservative_sac_main.py sets min_q / max_q from the
    dataset's rewards (``calculate_q_bounds_from_data``) and, after each batch of online
    trajectories, ``min_q = min(min_q, min_reward / (1 - discount))`` (and max_q likewise).
    Rewards are scaled (as the TD target's); the agent clips Q' with them (``algo.q_target_clip``)."""

    def __init__(self, agent, discount: float, offline_rewards: np.ndarray | None = None):
        self.agent, self.discount = agent, discount
        self.low, self.high = np.inf, -np.inf
        if offline_rewards is not None and len(offline_rewards):
            self.widen(offline_rewards)

    def widen(self, rewards: np.ndarray) -> None:
        low, high = min(self.low, float(np.min(rewards))), max(self.high, float(np.max(rewards)))
        if (low, high) != (self.low, self.high):
            self.low, self.high = low, high
            self.agent.set_td_target_bounds(low / (1.0 - self.discount), high / (1.0 - self.discount))
