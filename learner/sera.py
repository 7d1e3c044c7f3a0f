"""SERA's Q-conditioned state-entropy bonus (Zhang et al., arXiv 2310.19805; later titled QCSE).

SERA adds ``r + lambda * r_int`` during online fine-tuning, where r_int is the
value-conditional state-entropy estimate of VCSE (Kim et al. 2023, "Accelerating
Reinforcement Learning with Value-Conditional State Entropy Exploration": its kNN
(KSG-style) estimator of the conditional entropy H(s | v); we did not have the paper's
text to cite the equation number, the formula is taken from its code,
``VCSE_SAC/vcse.py: VCSE.__call__`` of kingdy2002/VCSE) with the value v replaced by the
pretrained critic's Q(s, a).

What we took from the VCSE code:
- the estimator exactly (see ``vcse_bonus``): self included in the k nearest (distance 0),
  the max-norm of the joint space, strict ``<`` in the count, digamma(n + 1) / dim(s),
  log(2 eps + 1e-5), no normalisation of the result (VCSE's division by a running std is
  commented out);
- the state is the transition's current state ``obs`` (not ``next_obs``);
- the value is standardised over the batch: VCSE passes it through a fresh
  ``nn.LayerNorm(B)``, i.e. (v - mean) / sqrt(population var + 1e-5); so do we for Q.
VCSE_SAC also divides the observations by their dimension before the estimator
(``obs / obs.shape[-1]``); SERA's formula is written on s, and we do not rescale.

ASSUMED, because the SERA paper's text was not available to us:
- the kNN runs over the rows passed in (batch-wise, as VCSE), not over a whole buffer; the
  caller passes only the online rows of a batch;
- no squashing, clipping or running normalisation of r_int;
- Q(s, a) at the transition's action, min over the ensemble, from a FROZEN copy of the
  pretrained critic (the paper reports that a random Q made things worse than no bonus, so
  the conditioning must stay the pretrained one rather than follow the fine-tuned critic).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

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


class SeraBonus(nn.Module):
    """r_int(s, a) = vcse_bonus(s, standardise(min_i Q_i(s, a))) with a frozen copy of the pretrained critic.

    ``critic``: a ``learner.networks.CriticEnsemble``; it is deep-copied at construction
    (``requires_grad`` False, part of ``state_dict()``), so fine-tuning the original does
    not move the bonus. ``obs`` must be what that critic takes (with the agent's observation
    normaliser on, ``agent.normalizer(batch.obs)``); the kNN runs on the same ``obs``.
    """

    def __init__(self, critic, k: int = 10):
        super().__init__()
        self.k = k
        self.critic = copy.deepcopy(critic).requires_grad_(False)

    @torch.no_grad()
    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        q = self.critic(obs, action).min(dim=0).values
        q = (q - q.mean()) / torch.sqrt(q.var(unbiased=False) + STANDARDIZE_EPS)
        return vcse_bonus(obs, q, self.k)
