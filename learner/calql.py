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

Cameras (an ``ObsSpec`` with images; learner/pixel_encoder.py): the networks read features, not the
raw observation. ``encoder`` (DrQ's conv encoder per camera, the normalised state after it) is the
critic's: the critic loss trains it (its parameters sit in the critic's optimiser group). The policy
reads the same features detached, so its loss never moves the encoder (DrQ-v2, facebookresearch/drqv2
drqv2.py ``update``: ``obs = self.encoder(obs)`` ... ``self.update_actor(obs.detach(), step)``). The
target critic reads its own ``target_encoder``, Polyak-averaged with the target critic at the same
``tau`` (SERL, rail-berkeley/serl agents/continuous/sac.py ``SACAgent.update``: one
``target_update(soft_target_update_rate)`` over all critic parameters, encoder included, 0.005 by
default; our ``tau`` default is the same 5e-3). Every update shifts the obs and next_obs images
with their own random draws (DrQ's ``random_shift``; SERL's drq.py ``obs_rng`` / ``next_obs_rng``).
The CQL term's 3n sampled actions reuse each state's features: the encoder runs once per state
(``CriticEnsemble.forward_per_state``). A state-only agent has no encoder and runs as before.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from o2o.envs.obs_spec import ObsSpec

from .bonus import Bonus, bonus_names, build_bonuses
from .buffer import Batch
from .config import CalQLConfig, NetworkConfig
from .networks import CriticEnsemble, ObservationNormalizer, TanhGaussianPolicy, sample_tanh_gaussian
from .pixel_encoder import ObsEncoder, random_shift


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
    """Policy, critics, target critics, temperatures and their optimiser (and, with cameras, the encoders).

    ``obs``: the state dimension of a state-only task, or the task's ``ObsSpec`` (cameras and state)."""

    def __init__(self, obs: int | ObsSpec, action_dim: int, cfg: CalQLConfig, net: NetworkConfig, device="cpu"):
        super().__init__()
        self.obs_spec = obs if isinstance(obs, ObsSpec) else ObsSpec(int(obs))
        self.cfg, self.net_cfg = cfg, net
        self.obs_dim, self.action_dim = self.obs_spec.state_dim, action_dim
        self.normalizer = ObservationNormalizer(self.obs_dim)  # the state part only; images are scaled in the encoder
        # None on a state task: no modules, so its state_dict keys and update are as without cameras.
        self.encoder = self.target_encoder = self.bonus_encoder = None
        features = self.obs_dim
        if self.obs_spec.has_images:
            self.encoder = ObsEncoder(self.obs_spec)
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            features = self.encoder.out_dim
        self.policy = TanhGaussianPolicy(
            features, action_dim, net.policy_hidden, net.orthogonal_init, net.log_std_multiplier, net.log_std_offset
        )
        self.critic = CriticEnsemble(features, action_dim, net.critic_hidden, net.num_critics, net.orthogonal_init,
                                     net.critic_feature_norm)  # fmt: skip
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        if self.obs_spec.has_images and any(getattr(cfg, name) for name in bonus_names(cfg)):
            # RE3 (Seo et al. 2021, "State Entropy Maximization with Random Encoders for Efficient
            # Exploration", arXiv 2102.09430): a randomly initialised encoder, fixed for all of training,
            # gives the bonuses a feature space that does not drift as the critic's encoder learns. Shared by
            # the bonuses (``bonus_input``); in the state_dict, so a checkpoint keeps the same features.
            self.bonus_encoder = ObsEncoder(self.obs_spec).requires_grad_(False)
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
        bonus_dim = self.obs_dim if self.bonus_encoder is None else self.bonus_encoder.out_dim
        self.bonuses: tuple[Bonus, ...] = tuple(build_bonuses(bonus_dim, action_dim, cfg, net, device))
        for bonus in self.bonuses:
            self.add_module(bonus.name, bonus)
        # The encoder learns with the critic, at its learning rate (DrQ: one critic optimiser, encoder included).
        critic_params = list(self.critic.parameters())
        if self.encoder is not None:
            critic_params += list(self.encoder.parameters())
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.policy.parameters()), "lr": cfg.policy_lr},
                {"params": critic_params, "lr": cfg.critic_lr},
                {"params": [self.log_alpha], "lr": cfg.alpha_lr},
                {"params": [self.log_alpha_prime], "lr": cfg.alpha_prime_lr},
            ],
            **_fast_adam_kwargs(torch.device(device)),
        )
        # Cache-sized chunks help the eager CPU path only (compiled code and GPUs prefer one call).
        eager_cpu = torch.device(device).type == "cpu" and not cfg.compile
        self.chunk_rows = 2048 if eager_cpu else 0
        # Images per encoder call: 64 at 84x84 (a 14 MB first conv output) encodes 256 images 1.5-2x faster,
        # forward and backward, on 2 CPU cores than one call does (the ReLU reads each conv's output from cache).
        largest = max((c.height * c.width for c in self.obs_spec.cameras), default=1)
        self.chunk_images = max(8, 64 * 84 * 84 // largest) if eager_cpu else 0
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
        targets, encoders, temperatures, observation statistics and their optimiser state. This agent's
        settings, learning rates and exploration bonuses stay."""
        with torch.no_grad():
            for name in ("policy", "critic", "target_critic", "normalizer", "encoder", "target_encoder"):
                if getattr(self, name) is not None:
                    getattr(self, name).load_state_dict(getattr(other, name).state_dict())
            self.log_alpha.copy_(other.log_alpha)
            self.log_alpha_prime.copy_(other.log_alpha_prime)
        self.optimizer.load_state_dict(other.optimizer.state_dict())
        self._set_learning_rates()

    def set_td_target_bounds(self, low: float, high: float) -> None:
        """Bounds of ``q_target_clip`` (OOO: [min r, max r] / (1 - gamma) over all training data)."""
        self.td_target_bounds.copy_(torch.tensor([low, high]))

    def encode(self, state: torch.Tensor, images: dict[str, torch.Tensor], encoder: nn.Module | None = None,
               ) -> torch.Tensor:  # fmt: skip
        """What the policy and the critics read: the normalised state; on a camera task ``encoder``'s
        (default: the critic's) features of the uint8 images, then the normalised state."""
        state = self.normalizer(state)
        if self.encoder is None:
            return state
        return self._run_encoder(self.encoder if encoder is None else encoder, state, images)

    def bonus_input(self, state: torch.Tensor, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the exploration bonuses see of observations: ``state`` itself on a state task; on a camera
        task the fixed random encoder's features of the images, then ``state`` (RE3; see ``__init__``)."""
        if self.bonus_encoder is None:
            return state
        with torch.no_grad():
            return self._run_encoder(self.bonus_encoder, state, images)

    def _run_encoder(self, encoder: nn.Module, state: torch.Tensor, images: dict[str, torch.Tensor]) -> torch.Tensor:
        step = self.chunk_images
        if not step or len(state) <= step:
            return encoder(state, images)
        names = list(images)
        chunks = zip(state.split(step), *(images[name].split(step) for name in names))
        return torch.cat([encoder(rows, dict(zip(names, frames))) for rows, *frames in chunks])

    def intrinsic_reward(self, batch: Batch) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """The bonuses added to the reward inside the TD target (0.0 when none is on)."""
        total, metrics = 0.0, {}
        for bonus in self.bonuses:
            reward, bonus_metrics = bonus.reward(self, batch)
            total = total + reward
            metrics.update(bonus_metrics)
        return total, metrics

    def features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the networks read at s (with gradients into the encoder: the critic loss trains it), at s'
        for the policy, and at s' for the target critic (both without gradients).

        A state task: the normalised obs and next_obs (the last two the same tensor)."""
        if self.encoder is None:
            next_obs = self.normalizer(batch.next_obs)
            return self.normalizer(batch.obs), next_obs, next_obs
        # DrQ: obs and next_obs images shifted by their own random draws, anew every update.
        images = {name: random_shift(frames) for name, frames in batch.images.items()}
        next_images = {name: random_shift(frames) for name, frames in batch.next_images.items()}
        obs = self.encode(batch.obs, images)
        with torch.no_grad():
            next_obs = self.encode(batch.next_obs, next_images)
            target_next_obs = self.encode(batch.next_obs, next_images, self.target_encoder)
        return obs, next_obs, target_next_obs

    def policy_losses(self, features: torch.Tensor) -> tuple:
        """Policy loss, temperature loss, temperature and log pi at states with these ``features``.

        The policy reads them detached: its loss never reaches the encoder (DrQ-v2's ``obs.detach()``)."""
        cfg, features = self.cfg, features.detach()
        new_action, log_pi = self.policy(features)
        if cfg.auto_entropy:
            alpha = self.log_alpha.exp() * cfg.alpha_multiplier
        else:
            alpha = torch.full((), cfg.alpha_multiplier, device=features.device)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean() if cfg.auto_entropy else 0.0
        q_new = self.critic(features, new_action, detach_params=True).min(dim=0).values
        policy_loss = (alpha.detach() * log_pi - q_new).mean()
        return policy_loss, alpha_loss, alpha, log_pi

    def losses(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of all losses (each reaching only its own parameters) and the metrics."""
        cfg, n = self.cfg, self.cfg.cql_n_actions
        obs, next_obs, target_next_obs = self.features(batch)
        B = obs.shape[0]

        policy_loss, alpha_loss, alpha, log_pi = self.policy_losses(obs)

        # Actions the critic loss needs, without gradients: n at s and n at s' (CQL), and
        # n at s' for the target backup; the policy MLP runs once per state.
        with torch.no_grad():
            n_target = n if cfg.cql_max_target_backup else 1
            mean, log_std = self.policy.mean_and_log_std(torch.cat([obs.detach(), next_obs]))
            pi_cur, log_pi_cur = sample_tanh_gaussian(mean[:B], log_std[:B], n)
            pi_next, log_pi_next = sample_tanh_gaussian(mean[B:], log_std[B:], n)
            pi_target, log_pi_target = sample_tanh_gaussian(mean[B:], log_std[B:], n_target)

            target_actions = pi_target.view(B, n_target, -1)
            target_q = self.target_critic.forward_per_state(target_next_obs, target_actions).min(dim=0).values
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
            metrics.update(bonus.train_step(self, batch))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip is not None:
            critic_params = self.optimizer.param_groups[1]["params"]  # the critic's, and its encoder's
            metrics["critic_grad_norm"] = nn.utils.clip_grad_norm_(critic_params, self.cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            targets, sources = list(self.target_critic.parameters()), list(self.critic.parameters())
            if self.encoder is not None:  # the target encoder moves with the target critic, at the same tau
                targets += list(self.target_encoder.parameters())
                sources += list(self.encoder.parameters())
            torch._foreach_lerp_(targets, sources, self.cfg.tau)
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
        # The fixed random encoder of the bonuses (camera tasks): the checkpoint's, the features its RND was
        # trained on; this agent's fresh one if it had none; dropped if no bonus is on any more.
        saved = [k for k in weights if k.startswith("bonus_encoder.")]
        if self.bonus_encoder is None:
            for k in saved:
                del weights[k]
        elif not saved:
            weights.update({f"bonus_encoder.{k}": v for k, v in self.bonus_encoder.state_dict().items()})
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
