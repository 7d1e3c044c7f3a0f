"""The Cal-QL change in the critic loss: what is clipped, what is not, and CQL when off."""

import math

import pytest
import torch

from o2o.learner.buffer import Batch
from o2o.learner.calql import CalQLAgent, calibrate_policy_q
from o2o.learner.config import CalQLConfig, NetworkConfig

OBS, ACT, B, N = 5, 2, 64, 10


def make_agent(**algo) -> CalQLAgent:
    torch.manual_seed(0)
    cfg = CalQLConfig(cql_n_actions=N, **algo)
    return CalQLAgent(OBS, ACT, cfg, NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32]))


def make_batch(mc_value: float) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(
        obs=torch.randn(B, OBS, generator=g),
        action=torch.rand(B, ACT, generator=g) * 2 - 1,
        reward=torch.randn(B, generator=g),
        next_obs=torch.randn(B, OBS, generator=g),
        done=torch.zeros(B),
        mc_return=torch.full((B,), mc_value),
    )


def losses(agent: CalQLAgent, batch: Batch) -> dict:
    torch.manual_seed(123)  # the same sampled actions for every call
    return agent.losses(batch)[1]


def test_calibrate_policy_q_raises_values_below_the_bound_only():
    q = torch.tensor([[[-3.0, 0.5], [2.0, -1.0]]])  # (E=1, B=2, n=2)
    clipped, rate = calibrate_policy_q(q, torch.tensor([0.0, 1.0]))
    assert clipped.tolist() == [[[0.0, 0.5], [2.0, 1.0]]]
    assert rate.item() == pytest.approx(0.5)


def test_only_policy_action_values_are_clipped_never_random_ones():
    # Without importance sampling the OOD set is [q_rand (n), q_data (1), q_pi_next (n), q_pi_cur (n)].
    # With an MC bound far above every Q, the 2n policy values become the bound and dominate:
    # logsumexp = bound + log(2n). Had the n random values been clipped too it would be bound + log(3n).
    agent = make_agent(cql_importance_sample=False, calibrated=True)
    bound = 1000.0
    m = losses(agent, make_batch(bound))
    expected_gap = bound + math.log(2 * N) - m["q_data"].item()
    assert m["cql_gap"].item() == pytest.approx(expected_gap, abs=0.02)
    assert m["bound_rate"].item() == 1.0


def test_clipped_values_use_the_importance_sampled_policy_log_prob():
    agent = make_agent(cql_importance_sample=True, calibrated=True)
    m = losses(agent, make_batch(1000.0))
    # The gap follows the bound (policy values) and not the unclipped random values.
    assert m["cql_gap"].item() > 900


def test_calibration_off_is_plain_cql():
    batch_high = make_batch(1000.0)
    cql = losses(make_agent(calibrated=False), batch_high)
    # Cal-QL with a bound below every Q-value changes nothing: it equals CQL...
    calql_inactive = losses(make_agent(calibrated=True), make_batch(-1000.0))
    for key in ("critic_loss", "cql_gap", "td_loss", "policy_loss"):
        assert calql_inactive[key].item() == pytest.approx(cql[key].item(), rel=1e-5), key
    # ...and CQL ignores the MC return entirely, while Cal-QL with a high bound does not.
    assert cql["bound_rate"].item() == 0.0
    calql_active = losses(make_agent(calibrated=True), batch_high)
    assert calql_active["cql_gap"].item() > cql["cql_gap"].item() + 100


def test_update_changes_each_part_only_through_its_own_loss():
    agent = make_agent(cql_lagrange=True)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = agent.update(make_batch(0.0))
    after = agent.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("policy.") for k in changed)
    assert any(k.startswith("critic.") for k in changed)
    assert any(k.startswith("target_critic.") for k in changed)  # soft update
    assert {"log_alpha", "log_alpha_prime"} <= changed
    assert not any(k.startswith("normalizer.") for k in changed)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_per_state_critic_call_equals_the_row_by_row_call():
    agent = make_agent()
    g = torch.Generator().manual_seed(3)
    obs, actions = torch.randn(50, OBS, generator=g), torch.rand(50, 7, ACT, generator=g) * 2 - 1
    rows = agent.critic(obs.repeat_interleave(7, dim=0), actions.reshape(-1, ACT)).view(2, 50, 7)
    for chunk_rows in (0, 64):  # one call, and cache-sized chunks of states
        per_state = agent.critic.forward_per_state(obs, actions, chunk_rows)
        torch.testing.assert_close(per_state, rows, rtol=1e-5, atol=1e-5)
