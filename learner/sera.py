"""SERA's Q-conditioned state-entropy bonus (Zhang et al., arXiv 2310.19805; later titled QCSE).

SERA adds ``r + lambda * r_int`` during online fine-tuning, where r_int is the
value-conditional state-entropy estimate of VCSE (Kim et al. 2023, "Accelerating
Reinforcement Learning with Value-Conditional State Entropy Exploration": its kNN
(KSG-style) estimator of the conditional entropy H(s | v); we did not have the paper's
text to cite the equation number, the formula is taken from its code,
``VCSE_SAC/vcse.py: VCSE.__call__`` and ``VCSE_SAC/agent/sac.py: SACAgent.update`` of
kingdy2002/VCSE) with the value taken from the pretrained agent.

What we took from the VCSE code (``SACAgent.update``):
- the estimator exactly (see ``vcse_bonus``): self included in the k nearest (distance 0),
  the max-norm of the joint space, strict ``<`` in the count, digamma(n + 1) / dim(s),
  log(2 eps + 1e-5), no normalisation of the result (VCSE's division by a running std is
  commented out);
- the rows: the whole training batch (VCSE samples one batch and computes the bonus for all
  of it). ``sera_rows=batch`` (default) does the same, offline rows included;
- the state: the transition's current state ``obs`` (not ``next_obs``), divided by its
  dimension before the estimator (``obs / obs.shape[-1]``); ours is the agent's normalised obs;
- the value: V(s) = min over the critics of Q(s, mean action of the policy) (VCSE: its
  extrinsic target critic at ``dist.mean``), standardised over the batch through a fresh
  ``nn.LayerNorm(B)``, i.e. (v - mean) / sqrt(population var + 1e-5). SERA conditions on
  the PRETRAINED agent: a frozen copy of its critic and policy (the paper reports that a
  random Q made things worse than no bonus).

Ours, not VCSE's or SERA's (issue 18): VCSE's tasks never terminate, so a bonus of about
+2.3 per step there is harmless; on a task that ends at the goal with {0, 1} rewards, the
same bonus pays ~2.3 / (1 - gamma) for NOT finishing. ``sera_center`` (default on)
subtracts the batch mean of r_int, so the bonus ranks states (novel above familiar) without
adding a living reward; off reproduces VCSE's raw bonus. ``sera_condition=q_data`` keeps
the earlier reading of SERA's abstract (Q(s, a) at the transition's own action): the SERA
paper's body was not available to check which one it uses.

Cameras (ours): the value comes from frozen copies of the critic's encoder, critic and policy (the
features they were trained on); the kNN runs over the features of the agent's fixed random encoder,
then the normalised state (``agent.bonus_input``; RE3, Seo et al. 2021: a random encoder fixed for
training gives a stable space for kNN entropy estimates, where the learnt encoder's would drift).

ASSUMED, because the SERA paper's text was not available to us: the kNN runs over the batch
(as VCSE), not over a whole buffer; no squashing or clipping of r_int.
"""

from __future__ import annotations

import copy

import torch

from .bonus import Bonus
from .buffer import offline_batch_rows

STANDARDIZE_EPS = 1e-5  # torch.nn.LayerNorm's default eps, which VCSE's standardisation uses


def vcse_bonus(states: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """VCSE's kNN estimate of H(s | v) (Kim et al. 2023, as ``vcse.py`` computes it) per row, (N,).

    states (N, d), values (N,) or (N, 1):
        d_s(i,j) = ||s_i - s_j||,  d_v(i,j) = |v_i - v_j|
        eps_i    = k-th smallest max(d_s, d_v)(i, .)   (j = i counts, at distance 0)
        n_v(i)   = #{j : d_v(i,j) < eps_i}
        r(i)     = digamma(n_v(i) + 1) / d + log(2 eps_i + 1e-5)
    With N < k, k = N is used (the farthest row). O(N^2) memory; no host sync.
    """
    n, dim = states.shape
    k = min(k, n)
    values = values.reshape(n, 1).to(states.dtype)
    # Direct differences, not the matmul expansion: self-distances are exactly 0.
    d_s = torch.cdist(states, states, compute_mode="donot_use_mm_for_euclid_dist")
    d_v = (values - values.T).abs()
    eps = torch.maximum(d_s, d_v).kthvalue(k, dim=1).values
    n_v = (d_v < eps[:, None]).sum(dim=1).to(states.dtype)
    return torch.special.digamma(n_v + 1.0) / dim + torch.log(2.0 * eps + 1e-5)


class SeraBonus(Bonus):
    """r_int(s) = vcse_bonus(s / dim, standardise(v(s))) from frozen copies of the pretrained critic and policy.

    ``condition``: "value" (VCSE: v(s) = min_i Q_i(s, tanh(mean pi(s)))) or "q_data" (v = min_i
    Q_i(s, a) at the transition's action). ``center``: subtract the mean bonus of the rows
    passed in (no living bonus on terminating tasks). The copies are made by ``freeze``
    (at construction when ``critic`` and ``policy`` are given; ``requires_grad`` False, part of
    ``state_dict()``), so fine-tuning the originals does not move the bonus. ``obs`` must be
    what the critic takes (``agent.normalizer(batch.obs)``, or the frozen ``encoder``'s features on a
    camera task), ``states`` what the kNN runs over (default ``obs``).

    As the agent's bonus (``algo.sera``): frozen when fine-tuning starts (``start_fine_tuning``),
    from the critic as pretrained, never from a random one; until then it adds nothing. Its
    reward is ``coef`` times the bonus over ``rows``: the whole batch, or its online rows (the
    last ones, ``mixed_batch``), offline rows getting 0.
    """

    name = "sera"

    def __init__(self, critic=None, policy=None, k: int = 10, condition: str = "value", center: bool = True,
                 coef: float = 1.0, rows: str = "batch", encoder=None):  # fmt: skip
        super().__init__()
        if condition not in ("value", "q_data"):
            raise ValueError(f"algo.sera_condition={condition!r}: use value (VCSE's V(s)) or q_data (Q(s, a_data))")
        self.k, self.condition, self.center, self.coef, self.rows = k, condition, center, coef, rows
        self.critic = self.policy = self.encoder = None
        if critic is not None:
            self.freeze(critic, policy, encoder)

    @property
    def frozen(self) -> bool:
        return self.critic is not None

    def freeze(self, critic, policy, encoder=None) -> None:
        """SERA's value from now on: frozen copies of ``critic`` and ``policy`` (and the critic's ``encoder``
        on a camera task) as they are now."""
        self.critic = copy.deepcopy(critic).requires_grad_(False)
        self.policy = copy.deepcopy(policy).requires_grad_(False)
        self.encoder = None if encoder is None else copy.deepcopy(encoder).requires_grad_(False)

    def unfreeze(self) -> None:
        self.critic = self.policy = self.encoder = None

    @torch.no_grad()
    def forward(self, obs: torch.Tensor, action: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        states = obs if states is None else states
        if self.condition == "value":
            action = self.policy.deterministic(obs)
        v = self.critic(obs, action).min(dim=0).values
        v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + STANDARDIZE_EPS)
        bonus = vcse_bonus(states / states.shape[-1], v, self.k)
        return bonus - bonus.mean() if self.center else bonus

    # The agent's bonus interface (learner/bonus.py).

    @classmethod
    def from_config(cls, obs_dim: int, action_dim: int, cfg, net, device) -> "SeraBonus":
        return cls(None, None, cfg.sera_k, cfg.sera_condition, cfg.sera_center, cfg.sera_coef, cfg.sera_rows)

    def reward(self, agent, batch) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        if not self.frozen:
            return 0.0, {}
        # batch: VCSE's rows (all); online: the online rows only (``mixed_batch`` puts them last).
        n = len(batch.reward) if self.rows == "batch" else batch.online_rows
        if n < 2:
            return 0.0, {}
        obs = agent.normalizer(batch.obs[-n:])
        if self.encoder is None:
            sera = self(obs, batch.action[-n:])
        else:  # the value from the frozen encoder's features, the kNN over the fixed random encoder's
            images = {name: frames[-n:] for name, frames in batch.images.items()}
            sera = self(self.encoder(obs, images), batch.action[-n:], agent.bonus_input(obs, images))
        offline_zero = torch.zeros(len(batch.reward) - n, device=sera.device)
        metrics = {"sera_bonus": sera[-batch.online_rows:].mean() if batch.online_rows else sera.new_zeros(())}
        return self.coef * torch.cat([offline_zero, sera]), metrics

    def start_fine_tuning(self, agent, batch_size: int, offline_ratio: float, from_scratch: bool) -> str | None:
        check_sera_batch(batch_size, 0.0 if from_scratch else offline_ratio, self.k, self.rows)
        if self.frozen:  # a resumed run: the checkpoint's frozen copies
            return None
        self.freeze(agent.critic, agent.policy, agent.encoder)
        source = "random (from scratch)" if from_scratch else "pretrained"
        return f"SERA: values from frozen copies of the {source} critic and policy"

    def prepare_load(self, agent, weights: dict[str, torch.Tensor], state: dict) -> list[str]:
        """The checkpoint's frozen copies if it has them (a placeholder is overwritten by the load), else none."""
        saved = any(k.startswith(f"{self.name}.") for k in weights)
        if saved and not self.frozen:
            self.freeze(agent.critic, agent.policy, agent.encoder)
        elif not saved and self.frozen:
            self.unfreeze()
        return []


def check_sera_batch(batch_size: int, offline_ratio: float, k: int, rows: str = "batch") -> None:
    """SERA's kNN runs over a batch (or its online rows): there must be more than k of them."""
    if rows not in ("batch", "online"):
        raise ValueError(f"algo.sera_rows={rows!r}: use batch (VCSE: every row) or online (the online rows only)")
    online = batch_size - offline_batch_rows(batch_size, offline_ratio) if rows == "online" else batch_size
    if online <= k:
        raise ValueError(f"algo.sera needs more than algo.sera_k={k} online rows per batch, and batch_size={batch_size} "
                         f"with offline_ratio={offline_ratio} has {online}")  # fmt: skip
