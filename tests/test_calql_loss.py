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
        terminated=torch.zeros(B),
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


def test_clipped_values_use_the_importance_sampled_policy_log_prob(monkeypatch):
    """Official JaxCQL/conservative_sac.py: lines 236-240 clip the policy-action values to the MC
    return, then lines 252-265 subtract log pi (q_pi - log_pi) and log(0.5^|A|) from the random ones.

    The sampler's log-probs are replaced by fixed, asymmetric values (actions stay the real samples):
    with every policy value clipped to a bound b far above all Q, the random terms vanish and
    gap = b + log(sum_j exp(-L_cur_j) + sum_j exp(-L_next_j)) - mean Q(s, a_data). A flipped sign
    gives sum exp(+L), no correction log(2n), the correction before the clip max(q - L, b) = b: log(2n).
    """
    from o2o.learner import calql

    agent = make_agent(cql_importance_sample=True, calibrated=True)
    bound = 1000.0
    batch = make_batch(bound)
    log_pi_cur = torch.linspace(-4.0, 1.0, N)
    log_pi_next = torch.linspace(-1.0, 2.0, N)  # the actions at s' (CQL and target backup)
    with torch.no_grad():
        mean_at_s = agent.policy.mean_and_log_std(agent.normalizer(batch.obs))[0]
    real_sampler = calql.sample_tanh_gaussian

    def fixed_log_prob_sampler(mean, log_std, n=None):
        action, log_prob = real_sampler(mean, log_std, n)
        fixed = log_pi_cur if torch.allclose(mean, mean_at_s) else log_pi_next
        return action, fixed.repeat(mean.shape[0])

    monkeypatch.setattr(calql, "sample_tanh_gaussian", fixed_log_prob_sampler)
    m = losses(agent, batch)
    assert m["bound_rate"].item() == 1.0
    with torch.no_grad():
        q_data = agent.critic(agent.normalizer(batch.obs), batch.action).mean().item()
    expected = bound + torch.logsumexp(torch.cat([-log_pi_cur, -log_pi_next]), 0).item() - q_data
    assert m["cql_gap"].item() == pytest.approx(expected, abs=2e-3)
    # The alternatives this rules out are all more than 1 away.
    for wrong in (torch.cat([log_pi_cur, log_pi_next]), torch.zeros(2 * N)):
        assert abs(bound + torch.logsumexp(wrong, 0).item() - q_data - expected) > 1.0


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
    """Official conservative_sac.py line 318: value_and_multi_grad takes the gradient of each loss
    (policy, qf1, qf2, log_alpha, log_alpha_prime) w.r.t. its own parameters only. The fused
    backward of losses() must give, per parameter group, exactly torch.autograd.grad of that group's
    loss taken alone (from the slow reference in test_calql_math, built with full graphs).
    """
    from test_calql_math import fused_grads
    from test_calql_math import make_agent as make_tiny_agent
    from test_calql_math import make_batch as make_tiny_batch
    from test_calql_math import reference_losses

    agent = make_tiny_agent(cql_lagrange=True, backup_entropy=True, calibrated=True)
    with torch.no_grad():  # away from 0, where log_alpha * log_pi would hide a policy-gradient leak
        agent.log_alpha.fill_(-0.5)
        agent.log_alpha_prime.fill_(0.3)
    batch = make_tiny_batch()
    _, metrics, grads = fused_grads(agent, batch)
    assert 0.0 < metrics["bound_rate"].item() < 1.0  # some policy values clipped, some not
    ref = reference_losses(agent, batch)
    groups = {
        "policy": ("policy_loss", dict(agent.policy.named_parameters())),
        "critic": ("critic_loss", dict(agent.critic.named_parameters())),
        "log_alpha": ("alpha_loss", {"": agent.log_alpha}),
        "log_alpha_prime": ("alpha_prime_loss", {"": agent.log_alpha_prime}),
    }
    for group, (loss_name, params) in groups.items():
        expected = torch.autograd.grad(ref[loss_name], list(params.values()), retain_graph=True)
        for (name, _), want in zip(params.items(), expected):
            key = f"{group}.{name}" if name else group
            torch.testing.assert_close(grads[key], want, rtol=1e-4, atol=1e-5, msg=f"{key} <- {loss_name}")
    assert all(grads[k] is None for k in grads if k.startswith("target_critic."))
    # The check is sensitive: each loss WOULD move the other groups if its gradient leaked.
    for loss_name, other in [("policy_loss", agent.critic), ("critic_loss", agent.policy)]:
        leak = torch.autograd.grad(ref[loss_name], list(other.parameters()), retain_graph=True, allow_unused=True)
        assert max(g.abs().max().item() for g in leak if g is not None) > 1e-3, loss_name
    for loss_name, other in [("alpha_loss", agent.policy), ("alpha_prime_loss", agent.critic)]:
        leak = torch.autograd.grad(ref[loss_name], list(other.parameters()), retain_graph=True, allow_unused=True)
        assert max(g.abs().max().item() for g in leak if g is not None) > 1e-3, loss_name

    # One update moves every trained part, the targets by a soft update, and never the normaliser.
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    metrics = agent.update(batch)
    after = agent.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("target_critic.") for k in changed)
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
