"""The data settings: what turns raw env rewards into the rewards and MC returns o2o trains on.

Declared once, here. The agent's config inherits them (``algo.discount``, ``algo.reward_scale``,
...), a replay store saves them in its metadata (``StoreConfig.data``), the dataset loader
takes them (``load_transitions(..., data)``), and fine-tuning and the retrain compare them by
the names of this type. They define the data: the offline rows, the store's MC returns and the
TD targets must all use the same values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .mc_return import scale_rewards

# The names the replay store's metadata used before this type existed (read on open).
OLD_STORE_NAMES = {"gamma": "discount", "infinite_horizon": "mc_infinite_horizon"}


@dataclasses.dataclass
class DataSettings:
    discount: float = 0.99
    """gamma, for the TD targets and the MC returns."""
    reward_scale: float = 1.0
    """Rewards become r * reward_scale + reward_bias before anything else (AntMaze 10, Adroit 10, Kitchen 1)."""
    reward_bias: float = 0.0
    """See reward_scale (AntMaze -5, Adroit +5, Kitchen 0)."""
    mc_infinite_horizon: bool = False
    """MC return of a trajectory cut by a time limit starts from r_last / (1 - gamma) instead of 0
    (the official ``infinite_horizon`` switch, on for Kitchen)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(DataSettings))

    @classmethod
    def of(cls, source) -> "DataSettings":
        """The data settings of anything that has them as attributes (an agent config, a store
        config's ``data``) or as keys (a dict: a checkpoint's ``algo``, a store's metadata)."""
        get = source.get if isinstance(source, dict) else lambda name: getattr(source, name)
        return cls(**{name: get(name) for name in cls.names()})

    def scale(self, raw_rewards: np.ndarray) -> np.ndarray:
        """Raw env rewards as o2o trains on them: ``float32(raw * reward_scale + reward_bias)``,
        the one float32 arithmetic of offline rows, the store and the online learner."""
        return scale_rewards(raw_rewards, self.reward_scale, self.reward_bias)

    def differences(self, other: "DataSettings") -> dict[str, tuple]:
        """name -> (mine, theirs) of the settings that differ."""
        return {n: (getattr(self, n), getattr(other, n)) for n in self.names() if getattr(self, n) != getattr(other, n)}

    def normalized(self) -> "DataSettings":
        """The same settings as plain Python floats and bool (as saved in a store's metadata)."""
        return DataSettings(float(self.discount), float(self.reward_scale), float(self.reward_bias),
                            bool(self.mc_infinite_horizon))  # fmt: skip
