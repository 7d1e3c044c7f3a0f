"""Cal-QL (and CQL, the same code with calibration off) on a SAC backbone.

One pure update step ``batch -> metrics``: every loss is computed from the
pre-update parameters (as in the official JAX code, where each loss gets its
own gradient), one backward pass, one fused optimiser step, one lerp of the
targets. Metrics stay tensors; nothing forces a host-device sync.

Losses (official JaxCQL/conservative_sac.py, Cal-QL = ``calibrate_policy_q``):
  policy:  alpha * log pi(a|s) - min_i Q_i(s, a),  a ~ pi(.|s)
  critic:  (Q_i(s,a) - y)^2 + w * clip(T * logsumexp([q_rand, q_pi_next, q_pi_cur] / T) - Q_i(s,a))
  Cal-QL:  q_pi_cur, q_pi_next <- max(q, mc_return(s)); q_rand is never clipped.

Bonuses (learner/bonus.py: one interface; the agent adds up their rewards and never asks which
they are) and options, all inside the TD target y (the policy loss and the Cal-QL bound never
see them; the bound stays the extrinsic MC return):
  RND (OOO, cq/ Cal-QL agent): y = r + rnd_coef * r_int(s') + gamma (1 - d) Q'. OOO also
      computes intrinsic MC returns, but its calibration bound never uses them: neither do we.
  SERA: r <- r + sera_coef * r_int(s) over the batch or its online rows (learner/sera.py).
  OOO's Q bound (retraining; the exploring agent on some domains): Q' clipped to
      [min r, max r] / (1 - gamma) of the data (``set_td_target_bounds``), widened online.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .bonus import Bonus, bonus_names, build_bonuses
from .buffer import Batch
from .config import CalQLConfig, NetworkConfig
from .networks import CriticEnsemble, ObservationNormalizer, TanhGaussianPolicy, sample_tanh_gaussian


def calibrate_policy_q(q_policy: torch.Tensor, mc_return: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cal-QL change: policy-action Q-values (E, B, n) raised to the MC return (B,).

    Returns the clipped values and the bound rate (fraction that were below the bound).
    """
    bound = mc_return[None, :, None]
    return torch.maximum(q_policy, bound), (q_policy < bound).float().mean()


def cql_logsumexp_term(
    q_data: torch.Tensor,
    q_rand: torch.Tensor,
    q_pi_cur: torch.Tensor,
    q_pi_next: torch.Tensor,
    log_pi_cur: torch.Tensor,
    log_pi_next: torch.Tensor,
    action_dim: int,
    cfg: CalQLConfig,
) -> torch.Tensor:
    """Per-critic CQL gap E_B[clip(T * logsumexp(q_ood / T) - Q(s, a_data))], shape (E,)."""
    if cfg.cql_importance_sample:
        random_log_density = action_dim * math.log(0.5)
        q_ood = torch.cat(
            [q_rand - random_log_density, q_pi_next - log_pi_next, q_pi_cur - log_pi_cur], dim=-1
        )
    else:
        q_ood = torch.cat([q_rand, q_data.unsqueeze(-1), q_pi_next, q_pi_cur], dim=-1)
    ood = torch.logsumexp(q_ood / cfg.cql_temp, dim=-1) * cfg.cql_temp
    return (ood - q_data).clamp(cfg.cql_clip_diff_min, cfg.cql_clip_diff_max).mean(dim=-1)


class CalQLAgent(nn.Module):
    """Policy, critics, target critics, temperatures and their optimiser."""

    def __init__(self, obs_dim: int, action_dim: int, cfg: CalQLConfig, net: NetworkConfig, device="cpu"):
        super().__init__()
        self.cfg, self.net_cfg = cfg, net
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.normalizer = ObservationNormalizer(obs_dim)
        self.policy = TanhGaussianPolicy(
            obs_dim, action_dim, net.policy_hidden, net.orthogonal_init, net.log_std_multiplier, net.log_std_offset
        )
        self.critic = CriticEnsemble(obs_dim, action_dim, net.critic_hidden, net.num_critics, net.orthogonal_init,
                                     net.critic_feature_norm)  # fmt: skip
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # OOO's Q-target clip, [lo, hi] (set from the data by ``set_td_target_bounds``); finite, so
        # the divergence checks that scan every tensor stay meaningful.
        self.register_buffer("td_target_bounds", torch.tensor([-1e30, 1e30]))
        self.log_alpha = nn.Parameter(torch.zeros(()))
        # Official JaxCQL conservative_sac.py: log_alpha_prime = Scalar(1.0) (alpha' = e at the start;
        # CORL's cal_ql.py as well); log_alpha = Scalar(0.0).
        self.log_alpha_prime = nn.Parameter(torch.ones(()))
        self.target_entropy = cfg.target_entropy if cfg.target_entropy is not None else -float(action_dim)
        self.to(device)
        # Exploration bonuses, each under its own name (``agent.rnd``: state_dict keys ``rnd.*``);
        # each keeps its own optimiser, if any (learner/bonus.py).
        self.bonuses: tuple[Bonus, ...] = tuple(build_bonuses(obs_dim, action_dim, cfg, net, device))
        for bonus in self.bonuses:
            self.add_module(bonus.name, bonus)
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.policy.parameters()), "lr": cfg.policy_lr},
                {"params": list(self.critic.parameters()), "lr": cfg.critic_lr},
                {"params": [self.log_alpha], "lr": cfg.alpha_lr},
                {"params": [self.log_alpha_prime], "lr": cfg.alpha_prime_lr},
            ],
            **_fast_adam_kwargs(torch.device(device)),
        )
        # Cache-sized chunks help the eager CPU path only (compiled code and GPUs prefer one call).
        self.chunk_rows = 2048 if torch.device(device).type == "cpu" and not cfg.compile else 0
        self._step_fn = self._update
        if cfg.compile:
            self._step_fn = torch.compile(self._update, mode=cfg.compile_mode)

    @property
    def device(self) -> torch.device:
        return self.log_alpha.device

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step on every component; returns detached metric tensors."""
        return self._step_fn(batch)

    def start_fine_tuning(self, batch_size: int, offline_ratio: float, from_scratch: bool) -> list[str]:
        """Online fine-tuning starts (or resumes): each bonus checks the batches and sets itself up (SERA
        freezes its value from the critic as it is now); returns lines to log."""
        notes = [bonus.start_fine_tuning(self, batch_size, offline_ratio, from_scratch) for bonus in self.bonuses]
        return [note for note in notes if note]

    def load_networks(self, other: "CalQLAgent") -> None:
        """Continue from ``other`` (a retrained agent of the same shapes): its policy, critics,
        targets, temperatures, observation statistics and their optimiser state. This agent's
        settings, learning rates and exploration bonuses stay."""
        with torch.no_grad():
            for name in ("policy", "critic", "target_critic", "normalizer"):
                getattr(self, name).load_state_dict(getattr(other, name).state_dict())
            self.log_alpha.copy_(other.log_alpha)
            self.log_alpha_prime.copy_(other.log_alpha_prime)
        self.optimizer.load_state_dict(other.optimizer.state_dict())
        self._set_learning_rates()

    def set_td_target_bounds(self, low: float, high: float) -> None:
        """Bounds of ``q_target_clip`` (OOO: [min r, max r] / (1 - gamma) over all training data)."""
        self.td_target_bounds.copy_(torch.tensor([low, high]))

    def intrinsic_reward(self, batch: Batch) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """The bonuses added to the reward inside the TD target (0.0 when none is on)."""
        total, metrics = 0.0, {}
        for bonus in self.bonuses:
            reward, bonus_metrics = bonus.reward(self, batch)
            total = total + reward
            metrics.update(bonus_metrics)
        return total, metrics

    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of all losses (each reaching only its own parameters) and the metrics."""
        cfg, n = self.cfg, self.cfg.cql_n_actions
        obs, next_obs = self.normalizer(batch.obs), self.normalizer(batch.next_obs)
        B = obs.shape[0]

        # Policy and temperature.
        new_action, log_pi = self.policy(obs)
        if cfg.auto_entropy:
            alpha = self.log_alpha.exp() * cfg.alpha_multiplier
        else:
            alpha = torch.full((), cfg.alpha_multiplier, device=obs.device)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean() if cfg.auto_entropy else 0.0
        q_new = self.critic(obs, new_action, detach_params=True).min(dim=0).values
        policy_loss = (alpha.detach() * log_pi - q_new).mean()

        # Actions the critic loss needs, without gradients: n at s and n at s' (CQL), and
        # n at s' for the target backup; the policy MLP runs once per state.
        with torch.no_grad():
            n_target = n if cfg.cql_max_target_backup else 1
            mean, log_std = self.policy.mean_and_log_std(torch.cat([obs, next_obs]))
            pi_cur, log_pi_cur = sample_tanh_gaussian(mean[:B], log_std[:B], n)
            pi_next, log_pi_next = sample_tanh_gaussian(mean[B:], log_std[B:], n)
            pi_target, log_pi_target = sample_tanh_gaussian(mean[B:], log_std[B:], n_target)

            target_q = self.target_critic.forward_per_state(next_obs, pi_target.view(B, n_target, -1)).min(dim=0).values
            log_pi_target = log_pi_target.view(B, n_target)
            if cfg.cql_max_target_backup:
                best = target_q.argmax(dim=-1, keepdim=True)
                target_q, log_pi_target = target_q.gather(-1, best), log_pi_target.gather(-1, best)
            target_q = target_q.squeeze(-1)
            if cfg.q_target_clip:
                # OOO clips Q' itself, before the entropy backup (OOO_for_calql/conservative_sac.py,
                # "Bound the Q target": target_q_values = clip(target_q_values, min_q, max_q)), not y.
                target_q = target_q.clamp(self.td_target_bounds[0], self.td_target_bounds[1])
            if cfg.backup_entropy:
                target_q = target_q - alpha * log_pi_target.squeeze(-1)
            intrinsic, bonus_metrics = self.intrinsic_reward(batch)
            td_target = batch.reward + intrinsic + (1.0 - batch.terminated) * cfg.discount * target_q
            random_action = torch.empty_like(pi_cur).uniform_(-1.0, 1.0)

        # All critic inputs at s in one ensemble call: data, random, pi(s), pi(s') actions.
        actions = torch.cat(
            [batch.action.unsqueeze(1), random_action.view(B, n, -1), pi_cur.view(B, n, -1), pi_next.view(B, n, -1)],
            dim=1,
        )
        q_all = self.critic.forward_per_state(obs, actions, self.chunk_rows)
        q_data, q_rand, q_pi_cur, q_pi_next = q_all[..., 0], q_all[..., 1 : n + 1], q_all[..., n + 1 : 2 * n + 1], q_all[..., 2 * n + 1 :]
        td_loss = (q_data - td_target).square().mean(dim=-1)  # (E,)

        bound_rate = torch.zeros((), device=obs.device)
        if cfg.calibrated:
            q_pi_cur, bound_rate = calibrate_policy_q(q_pi_cur, batch.mc_return)
            q_pi_next, _ = calibrate_policy_q(q_pi_next, batch.mc_return)
        cql_gap = cql_logsumexp_term(
            q_data, q_rand, q_pi_cur, q_pi_next, log_pi_cur.view(1, B, n), log_pi_next.view(1, B, n),
            self.action_dim, cfg,
        )
        if cfg.cql_lagrange:
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            cql_loss = alpha_prime.detach() * cfg.cql_alpha * (cql_gap - cfg.cql_target_action_gap)
            alpha_prime_loss = -(alpha_prime * cfg.cql_alpha * (cql_gap.detach() - cfg.cql_target_action_gap)).mean()
        else:
            alpha_prime = torch.full((), cfg.cql_alpha, device=obs.device)
            cql_loss = cfg.cql_alpha * cql_gap
            alpha_prime_loss = 0.0
        critic_loss = (td_loss + cql_loss).sum()

        total = policy_loss + critic_loss + alpha_loss + alpha_prime_loss
        metrics = {
            "policy_loss": policy_loss,
            "critic_loss": critic_loss,
            "td_loss": td_loss.mean(),
            "cql_gap": cql_gap.mean(),
            "alpha": alpha,
            "alpha_prime": alpha_prime,
            "entropy": -log_pi.mean(),
            "q_data": q_data.mean(),
            "mc_return": batch.mc_return.mean(),
            "q_pi": q_pi_cur.mean(),
            "bound_rate": bound_rate,
            **bonus_metrics,
        }
        return total, {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

    def _update(self, batch: Batch) -> dict[str, torch.Tensor]:
        total, metrics = self.losses(batch)  # the TD target's bonuses are the pre-update ones
        for bonus in self.bonuses:
            metrics.update(bonus.train_step(batch))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip is not None:
            metrics["critic_grad_norm"] = nn.utils.clip_grad_norm_(self.critic.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(
                list(self.target_critic.parameters()), list(self.critic.parameters()), self.cfg.tau
            )
        return metrics

    def training_state(self) -> dict:
        """Everything a resume needs from the agent (weights, targets, temperatures, bonuses, optimisers)."""
        state = {"agent": self.state_dict(), "optimizer": self.optimizer.state_dict()}
        for bonus in self.bonuses:
            state.update(bonus.optimizer_state())
        return state

    def load_training_state(self, state: dict) -> list[str]:
        """Load a checkpoint's state; returns notes on bonuses it had not (or no longer) trained.

        Each bonus on matches itself to the checkpoint (``Bonus.prepare_load``: a checkpoint
        without RND keeps this agent's fresh one; one with SERA's frozen copies restores them);
        the weights of a bonus that is off are not used."""
        weights, notes = dict(state["agent"]), []
        on = {bonus.name for bonus in self.bonuses}
        for name in bonus_names(self.cfg):
            dropped = [k for k in weights if k.startswith(f"{name}.")] if name not in on else []
            for k in dropped:
                del weights[k]
            if dropped:
                notes.append(f"the checkpoint's {name.upper()} is not used (algo.{name}=false)")
        for bonus in self.bonuses:
            notes += bonus.prepare_load(self, weights, state)
        self.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self._set_learning_rates()
        return notes

    def _set_learning_rates(self) -> None:
        # A saved optimiser state carries the learning rates it ran with; this agent's config
        # may change them (fine-tuning), so the config wins.
        lrs = (self.cfg.policy_lr, self.cfg.critic_lr, self.cfg.alpha_lr, self.cfg.alpha_prime_lr)
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        for bonus in self.bonuses:
            bonus.reset_learning_rate()


def _fast_adam_kwargs(device: torch.device) -> dict:
    """Fused Adam where torch supports it (one kernel for all parameters), else foreach."""
    if device.type in ("cuda", "cpu"):
        return {"fused": True}
    return {"foreach": True}
