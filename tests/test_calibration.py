"""Calibration on a tiny problem with a known behaviour value.

A contextual bandit (every episode is one step): s ~ U[-1, 1]^2, the behaviour
policy plays a = 0.5 s_0 + N(0, 0.3^2), the reward is 1 - (a - 0.5 s_0)^2, so
V^mu(s) is known by sampling the behaviour policy. Cal-QL promises that the
learned Q of the learned policy's actions is not pushed below V^mu; CQL with
the same conservative weight underestimates it.
"""

import torch

from o2o.learner.buffer import Batch
from o2o.learner.calql import CalQLAgent
from o2o.learner.config import CalQLConfig, NetworkConfig

ROWS, STEPS, BATCH = 5000, 300, 128


def behaviour(s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (0.5 * s[:, :1] + 0.3 * torch.randn(len(s), 1, generator=g)).clamp(-1, 1)


def reward(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 1 - (a[:, 0] - 0.5 * s[:, 0]) ** 2


def gap_to_behaviour_value(calibrated: bool) -> tuple[float, float]:
    """Mean of Q(s, pi(s)) - V^mu(s) over held-out states, and the share of states with Q >= V^mu."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(ROWS, 2, generator=g) * 2 - 1
    a = behaviour(s, g)
    r = reward(s, a)  # one-step episodes: the MC return-to-go is the reward
    torch.manual_seed(0)
    agent = CalQLAgent(
        2, 1,
        CalQLConfig(calibrated=calibrated, cql_alpha=10.0, cql_max_target_backup=False),
        NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32]),
    )
    done = torch.ones(BATCH)
    for _ in range(STEPS):
        idx = torch.randint(0, ROWS, (BATCH,))
        agent.update(Batch(s[idx], a[idx], r[idx], s[idx], done, r[idx]))

    test_s = torch.rand(500, 2, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        policy_action, _ = agent.policy(test_s)
        q = agent.critic(test_s, policy_action).min(0).values
        samples = [reward(test_s, behaviour(test_s, torch.Generator().manual_seed(k))) for k in range(200)]
        v_mu = torch.stack(samples).mean(0)
    return (q - v_mu).mean().item(), (q >= v_mu - 0.05).float().mean().item()


def test_calql_is_calibrated_where_cql_underestimates():
    calql_gap, calql_share = gap_to_behaviour_value(calibrated=True)
    cql_gap, cql_share = gap_to_behaviour_value(calibrated=False)
    assert calql_gap > 0.0, calql_gap
    assert calql_share > 0.75, calql_share
    assert cql_gap < -0.1, cql_gap
    assert cql_share < calql_share - 0.2
