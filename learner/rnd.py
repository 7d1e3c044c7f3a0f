"""RND novelty bonus, as OOO's exploring agent uses it (Mark et al. 2023, code MaxSobolMark/OOO).

Random Network Distillation (Burda et al. 2018): a predictor MLP is trained to match a
fixed, randomly initialised target MLP; its error is high on states unlike those it was
trained on. What follows is OOO's Cal-QL variant (``OOO_for_calql/rnd_net.py`` and the
RND block at the top of ``ConservativeSAC._train_step`` in ``conservative_sac.py``):

- Networks (``RNDNet``): predictor and target are both ``FullyConnectedNetwork(output_dim=512,
  arch="512-512", orthogonal_init=True)``: ReLU, hidden layers orthogonal(sqrt 2), last layer
  orthogonal(1e-2), zero biases; here ``networks.MLP``, which inits the same way.
- Input: the next observation, ``clip((s' - mean) / sqrt(var), -5, 5)`` with the running
  observation statistics (OOO divides by sqrt(var) with no epsilon; the statistics start at
  mean 0, var 1, count 1e-4, so var stays positive; they are kept in float64 as OOO declares them).
- Predictor loss (``update_rnd``): per row, the mean over features of the squared error; rows
  kept by a Bernoulli(``rnd_update_proportion`` = 0.25) mask drawn per row, loss =
  sum(row loss * mask) / max(sum(mask), 1). Adam, lr 1e-4 (``rnd_lr``).
- Bonus (``calculate_intrinsic_reward``): per row, the MAX over features of the squared error,
  divided by sqrt of the running variance of the bonus; no mean subtraction, no clipping.
- Order within one training step (``_train_step``): the predictor's gradient step and the
  bonus are both computed from the same pre-step state (predictor, observation statistics,
  bonus statistics); then the bonus statistics are updated from that bonus (already divided
  by sqrt(var): OOO feeds the normalised bonus, so the variance tracked is the normalised
  one's: with a steady raw bonus of std sigma it settles at var = sigma, so the bonus is
  raw / sqrt(sigma), not raw / sigma), then the
  observation statistics from the batch. Here: call ``bonus(next_obs)``
  for the TD target, then ``update(next_obs)``; ``update`` recomputes the same pre-step
  bonus in its own forward pass, so the statistics see exactly the values the caller used.
  (OOO's IQL variant, ``OOO_for_iql/learner.py: update_rnd``, instead steps the predictor
  first and takes the bonus from the stepped predictor.)

Cameras: RND's input is ``agent.bonus_input(next_obs, next_images)``: the features of the agent's
fixed random encoder (RE3, Seo et al. 2021; learner/calql.py), then the state, normalised as above.
The predictor never sees the critic's encoder, whose features move as it learns.

Where we differ from the release:
- OOO updates the observation statistics from ``batch["observations"]`` while it normalises
  ``batch["next_observations"]``; ``update(next_obs, obs)`` does the same when ``obs`` is
  given, and uses ``next_obs`` otherwise (the same states but for each episode's ends).
- In the Cal-QL release the RND block reads ``self._train_states`` inside a function jitted
  with ``self`` static, so as written it sees the train state captured at the first trace
  (apparently a bug: each call would restart from the initial predictor and statistics). We
  follow what the code means, the current state.
"""

from __future__ import annotations

import torch
from torch import nn

from .bonus import Bonus
from .networks import MLP

OBS_CLIP = 5.0


class RunningMeanStd(nn.Module):
    """Running mean / variance (parallel-variance update, as OOO/openai baselines), kept as buffers so they checkpoint.

    Same update as OOO's ``RunningMeanStd.update_from_moments`` (Chan et al.'s parallel
    algorithm): the batch's mean and population variance are merged with the running ones,
    weighted by counts. Starts at mean 0, var 1, count ``epsilon``, as OOO. Float64 buffers.
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(epsilon, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x`` of shape (N, *shape); no host sync."""
        x = x.to(torch.float64)
        n = x.shape[0]
        batch_mean, batch_var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
        self.mean.add_(delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)


class RND(Bonus):
    """Predictor, fixed target, running statistics and the predictor's optimiser (``self.optimizer``).

    The target never trains (``requires_grad`` False) but is in ``state_dict()``, so a
    checkpoint restores the same random target. As the agent's bonus (``algo.rnd``): its reward is
    ``coef * bonus(next_obs)``; it trains with each of the agent's updates, from the first
    pretraining step on (OOO), so offline states are not novel.
    """

    name = "rnd"

    def __init__(
        self,
        obs_dim: int,
        hidden: list[int] = [512, 512],  # noqa: B006  (never mutated; the signature shows the default)
        features: int = 512,
        lr: float = 1e-4,
        train_fraction: float = 0.25,
        device="cpu",
        coef: float = 1.0,
    ):
        super().__init__()
        self.train_fraction, self.lr, self.coef = train_fraction, lr, coef
        self.predictor = MLP(obs_dim, list(hidden), features, orthogonal_init=True)
        self.target = MLP(obs_dim, list(hidden), features, orthogonal_init=True).requires_grad_(False)
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.bonus_rms = RunningMeanStd(())
        self.to(device)
        # Fused Adam where torch has it (CPU, CUDA), as the agent's optimiser (calql imports this module).
        fast = {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=lr, **fast)

    def _normalize(self, next_obs: torch.Tensor) -> torch.Tensor:
        scaled = (next_obs - self.obs_rms.mean) / self.obs_rms.var.sqrt()
        return scaled.clamp(-OBS_CLIP, OBS_CLIP).to(next_obs.dtype)

    def _squared_error(self, next_obs: torch.Tensor) -> torch.Tensor:
        """(B, features) squared error of the predictor; gradients reach the predictor only."""
        x = self._normalize(next_obs)
        with torch.no_grad():
            target = self.target(x)
        return (self.predictor(x) - target).square()

    def _bonus_from_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        scale = self.bonus_rms.var.sqrt().to(squared_error.dtype)
        return squared_error.detach().amax(dim=-1) / scale

    @torch.no_grad()
    def bonus(self, next_obs: torch.Tensor) -> torch.Tensor:
        """Novelty of each next observation, (B,): max_f (pred - target)^2 / sqrt(var of the bonus)."""
        return self._bonus_from_error(self._squared_error(next_obs))

    def update(self, next_obs: torch.Tensor, obs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One predictor step on ``next_obs``, then the running statistics (OOO's order; see the module doc).

        ``obs``: the states whose statistics OOO updates (``batch["observations"]``); default
        ``next_obs``. Returns detached metric tensors; no host sync.
        """
        squared_error = self._squared_error(next_obs)
        bonus = self._bonus_from_error(squared_error)  # = bonus(next_obs) before this step
        row_loss = squared_error.mean(dim=-1)
        mask = (torch.rand(row_loss.shape, device=row_loss.device) < self.train_fraction).to(row_loss.dtype)
        loss = (row_loss * mask).sum() / mask.sum().clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.bonus_rms.update(bonus)
        self.obs_rms.update(next_obs if obs is None else obs)
        return {
            "rnd_loss": loss.detach(),
            "rnd_bonus": bonus.mean(),
            "rnd_bonus_max": bonus.max(),
            "rnd_bonus_var": self.bonus_rms.var.to(bonus.dtype),
        }

    def training_state(self) -> dict:
        """Weights (predictor and target), running statistics and the optimiser state."""
        return {"rnd": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["rnd"])
        self.optimizer.load_state_dict(state["optimizer"])

    # The agent's bonus interface (learner/bonus.py).

    @classmethod
    def from_config(cls, obs_dim: int, action_dim: int, cfg, net, device) -> "RND":
        return cls(obs_dim, net.rnd_hidden, net.rnd_features, cfg.rnd_lr, cfg.rnd_train_fraction, device, cfg.rnd_coef)

    def reward(self, agent, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # its metrics: ``train_step``
        return self.coef * self.bonus(agent.bonus_input(batch.next_obs, batch.next_images)), {}

    def train_step(self, agent, batch) -> dict[str, torch.Tensor]:
        # Camera tasks: the fixed random encoder runs again here (no grad); it is not the learnt encoder.
        return self.update(agent.bonus_input(batch.next_obs, batch.next_images))

    def optimizer_state(self) -> dict:
        return {"rnd_optimizer": self.optimizer.state_dict()}

    def prepare_load(self, agent, weights: dict[str, torch.Tensor], state: dict) -> list[str]:
        """A checkpoint without RND (turned on for fine-tuning) keeps this fresh one."""
        if not any(k.startswith(f"{self.name}.") for k in weights):
            weights.update({f"{self.name}.{k}": v for k, v in self.state_dict().items()})
            return ["RND starts untrained: the checkpoint has none (OOO trains it from the first offline step: "
                    "pretrain with algo.rnd=true)"]  # fmt: skip
        if "rnd_optimizer" in state:
            self.optimizer.load_state_dict(state["rnd_optimizer"])
        return []

    def reset_learning_rate(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
