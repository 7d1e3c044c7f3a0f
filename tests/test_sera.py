"""SERA's bonus (learner/sera.py) against a slow double-loop reference of VCSE's estimator.

The reference follows kingdy2002/VCSE ``VCSE_SAC/vcse.py`` one pair (i, j) at a time in
numpy float64. scipy is not installed here; digamma at the integers it is needed at is
exact from the harmonic numbers: psi(m) = -gamma_Euler + sum_{i < m} 1 / i.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from o2o.learner.networks import CriticEnsemble, TanhGaussianPolicy
from o2o.learner.sera import SeraBonus, vcse_bonus

EULER_GAMMA = 0.57721566490153286060


def digamma_int(m: int) -> float:
    return -EULER_GAMMA + sum(1.0 / i for i in range(1, m))


def reference(states: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    n, dim = states.shape
    k = min(k, n)
    out = np.empty(n)
    for i in range(n):
        joint, d_v = [], []
        for j in range(n):
            d_s_ij = math.sqrt(sum((states[i, c] - states[j, c]) ** 2 for c in range(dim)))
            d_v_ij = abs(values[i] - values[j])
            joint.append(max(d_s_ij, d_v_ij))
            d_v.append(d_v_ij)
        eps = sorted(joint)[k - 1]  # the point itself is in the list, at distance 0
        n_v = sum(1 for d in d_v if d < eps)
        out[i] = digamma_int(n_v + 1) / dim + math.log(2 * eps + 1e-5)
    return out


def test_digamma_reference_is_right():
    assert digamma_int(1) == -EULER_GAMMA
    assert abs(digamma_int(7) - 1.872784335098467) < 1e-12  # psi(7), tabulated


def test_hand_built_batch_matches_the_double_loop():
    # Integer grid points and integer values: exact ties between d_s, d_v and eps, so the
    # strict '<' in the count and the self-distance 0 both matter.
    states = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [3, 0], [3, 4], [0, 2], [5, 5], [1, 1], [2, 2]], float)
    values = np.array([0, 1, 0, 2, 1, 3, 0, 5, 2, 1], float)
    for k in (1, 2, 3, 5, 10):
        got = vcse_bonus(torch.tensor(states), torch.tensor(values), k)
        np.testing.assert_allclose(got.numpy(), reference(states, values, k), rtol=1e-12, atol=1e-12, err_msg=f"k={k}")
    # values as (N, 1) are taken too (VCSE passes them so)
    got = vcse_bonus(torch.tensor(states), torch.tensor(values)[:, None], 3)
    np.testing.assert_allclose(got.numpy(), reference(states, values, 3), rtol=1e-12)


def test_random_float32_batch_matches_the_double_loop():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(60, 4)).astype(np.float32)
    values = rng.normal(size=60).astype(np.float32)
    got = vcse_bonus(torch.tensor(states), torch.tensor(values), 7)
    expected = reference(states.astype(np.float64), values.astype(np.float64), 7)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_isolated_state_gets_a_larger_bonus():
    rng = np.random.default_rng(1)
    crowd = rng.normal(0.0, 0.1, size=(30, 3))
    states = np.concatenate([crowd, [[3.0, -3.0, 3.0]]])
    values = np.concatenate([rng.normal(0.0, 1.0, 30), [0.0]])  # its value is an ordinary one
    bonus = vcse_bonus(torch.tensor(states), torch.tensor(values), 5).numpy()
    assert bonus[-1] > bonus[:-1].max() + 1.0, bonus
    np.testing.assert_allclose(bonus, reference(states, values, 5), rtol=1e-10)


def test_k_larger_than_the_batch_uses_all_rows():
    states = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    values = np.array([0.5, -1.0, 2.0, 0.0])
    got = vcse_bonus(torch.tensor(states), torch.tensor(values), 10)
    np.testing.assert_allclose(got.numpy(), reference(states, values, 4), rtol=1e-12)
    assert torch.isfinite(vcse_bonus(torch.zeros(1, 2), torch.zeros(1), 10)).all()  # one row: eps 0


def pretrained_like(obs_dim: int, act_dim: int) -> tuple[CriticEnsemble, TanhGaussianPolicy]:
    torch.manual_seed(0)
    critic = CriticEnsemble(obs_dim, act_dim, [32, 32], num_critics=2)
    policy = TanhGaussianPolicy(obs_dim, act_dim, [32, 32])
    with torch.no_grad():  # visibly different members and a policy that is not ~0, as after pretraining
        for w in critic.weights:
            w.mul_(torch.rand_like(w) * 30)
        for w in policy.parameters():
            w.mul_(5)
    return critic, policy


def value_by_hand(critic, policy, obs: torch.Tensor, action: torch.Tensor | None) -> np.ndarray:
    """VCSE's v: min over the critics at the policy's mean action (or the data action), standardised
    over the rows as nn.LayerNorm(B) does (population variance + 1e-5), in float64."""
    with torch.no_grad():
        if action is None:
            mean, _ = policy.mean_and_log_std(obs)
            action = torch.tanh(mean)
        q = critic(obs, action).double().numpy().min(axis=0)
    return (q - q.mean()) / np.sqrt(q.var() + 1e-5)


def test_sera_bonus_is_vcse_on_scaled_states_conditioned_on_the_frozen_pretrained_value():
    obs_dim, act_dim, n = 4, 2, 48
    critic, policy = pretrained_like(obs_dim, act_dim)
    as_pretrained = (copy.deepcopy(critic), copy.deepcopy(policy))
    obs, action = torch.randn(n, obs_dim), torch.rand(n, act_dim) * 2 - 1

    # VCSE_SAC/agent/sac.py: the kNN on obs / obs.shape[-1], v = min Q(s, dist.mean); raw (VCSE) and centred.
    states = obs.double().numpy() / obs_dim
    raw = reference(states, value_by_hand(*as_pretrained, obs, None), 5)
    vcse = SeraBonus(critic, policy, k=5, condition="value", center=False)
    np.testing.assert_allclose(vcse(obs, action).numpy(), raw, rtol=1e-4, atol=1e-4)
    centred = SeraBonus(critic, policy, k=5)  # the default
    np.testing.assert_allclose(centred(obs, action).numpy(), raw - raw.mean(), rtol=1e-4, atol=1e-4)
    assert abs(float(centred(obs, action).mean())) < 1e-5
    # The data action does not matter for V(s); for q_data it does.
    torch.testing.assert_close(vcse(obs, -action), vcse(obs, action))
    q_data = SeraBonus(critic, policy, k=5, condition="q_data", center=False)
    np.testing.assert_allclose(q_data(obs, action).numpy(), reference(states, value_by_hand(*as_pretrained, obs, action), 5),
                               rtol=1e-4, atol=1e-4)  # fmt: skip

    before = centred(obs, action)
    with torch.no_grad():  # fine-tuning moves the original critic and policy ...
        for w in [*critic.parameters(), *policy.parameters()]:
            w.copy_(torch.randn_like(w))
    torch.testing.assert_close(centred(obs, action), before, rtol=0, atol=0)  # ... not the bonus
    assert not torch.allclose(SeraBonus(critic, policy, k=5)(obs, action), before)  # (it does depend on them)

    assert not any(p.requires_grad for p in centred.parameters())
    assert critic.weights[0].requires_grad  # the originals are left trainable
    keys = centred.state_dict().keys()
    assert any(k.startswith("critic.") for k in keys) and any(k.startswith("policy.") for k in keys)
    restored = SeraBonus(*pretrained_like(obs_dim, act_dim), k=5)
    restored.load_state_dict(centred.state_dict())
    torch.testing.assert_close(restored(obs, action), before, rtol=0, atol=0)


def test_an_unknown_condition_is_refused():
    import pytest

    with pytest.raises(ValueError, match="sera_condition"):
        SeraBonus(*pretrained_like(2, 1), condition="q")
