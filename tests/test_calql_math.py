"""Cal-QL losses against a slow, independent reference written from the official code.

Reference: nakamotoo/Cal-QL, JaxCQL/conservative_sac.py (``_train_step.loss_fn``) and
JaxCQL/model.py (``TanhGaussianPolicy``); line numbers below are from that repository.

The reference below recomputes every loss with plain Python loops (one critic, one
state, one action at a time), its own MLP forward pass from the agent's weights and
``torch.distributions`` for the tanh-Gaussian log-probs. It draws the same random
numbers as ``CalQLAgent.losses`` by replaying the global torch RNG in the order the
update consumes it (see ``Draws``); ``test_reference_replays_the_update_exactly`` fails
first, with a clear message, if that order ever changes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution

from o2o.learner.buffer import Batch
from o2o.learner.calql import CalQLAgent
from o2o.learner.config import CalQLConfig, NetworkConfig
from o2o.learner.networks import TanhGaussianPolicy, sample_tanh_gaussian

OBS, ACT, B, N = 3, 2, 8, 10
SEED = 1234


# ----------------------------------------------------------------------------- fixtures


def make_agent(**algo) -> CalQLAgent:
    """A tiny agent moved away from its init: O(1) Q-values, distinct critics and targets, a normaliser."""
    torch.manual_seed(0)
    agent = CalQLAgent(
        OBS, ACT, CalQLConfig(cql_n_actions=N, **algo), NetworkConfig(policy_hidden=[16, 16], critic_hidden=[16, 16])
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=g))
        for p_t, p in zip(agent.target_critic.parameters(), agent.critic.parameters()):
            p_t.copy_(p + 0.3 * torch.randn(p.shape, generator=g))  # targets differ from the critics
        for p in agent.policy.net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        agent.normalizer.set_statistics(torch.randn(OBS, generator=g), torch.rand(OBS, generator=g) + 0.5)
    return agent


def make_batch(mc_return=None, terminated=None) -> Batch:
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, OBS, generator=g)
    return Batch(
        obs=obs,
        action=(torch.rand(B, ACT, generator=g) * 2 - 1) * 0.99,
        reward=torch.randn(B, generator=g),
        next_obs=obs + 0.5 * torch.randn(B, OBS, generator=g),
        terminated=torch.tensor([1.0, 0.0] * (B // 2)) if terminated is None else terminated,
        mc_return=torch.randn(B, generator=g) * 0.5 if mc_return is None else mc_return,
    )


def code_losses(agent: CalQLAgent, batch: Batch, seed: int = SEED):
    torch.manual_seed(seed)
    return agent.losses(batch)


# ----------------------------------------------------------------------------- reference


def mlp(x: torch.Tensor, weights, biases) -> torch.Tensor:
    """Plain ReLU MLP, weights laid out (in, out) as in Flax Dense."""
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = x @ w + b
        if i < len(weights) - 1:
            x = torch.relu(x)
    return x


def q_value(critic, e: int, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Q_e(s, a) of critic e at one state (obs_dim,) for one action (A,) -> () or K actions (K, A) -> (K,)
    (model.py FullyConnectedQFunction: concat [s, a], then the MLP)."""
    actions = action.reshape(-1, action.shape[-1])
    x = torch.cat([obs.expand(len(actions), -1), actions], dim=-1)
    q = mlp(x, [w[e] for w in critic.weights], [b[e, 0] for b in critic.biases])[:, 0]
    return q.reshape(action.shape[:-1])


def tanh_gaussian(policy: TanhGaussianPolicy, obs: torch.Tensor):
    """model.py:118-125: mean, log_std = split(MLP(s)); log_std = mult * log_std + offset, clip [-20, 2];
    Transformed(MultivariateNormalDiag(mean, exp(log_std)), Block(Tanh)). Returns mean, std, dist, tanh."""
    out = mlp(obs, list(policy.net.weights), list(policy.net.biases))
    mean, raw = out[..., :ACT], out[..., ACT:]
    log_std = torch.clamp(policy.log_std_multiplier * raw + policy.log_std_offset, -20.0, 2.0)
    tanh = TanhTransform(cache_size=1)
    dist = TransformedDistribution(Independent(Normal(mean, log_std.exp()), 1), [tanh])
    return mean, log_std.exp(), dist, tanh


def sample(policy, obs, noise):
    """Reparameterised sample a = tanh(mean + std * noise) and log pi(a|s) from torch.distributions."""
    mean, std, dist, tanh = tanh_gaussian(policy, obs)
    action = tanh(mean + std * noise)
    return action, dist.log_prob(action)  # the cached pre-tanh value is used: no atanh round trip


@dataclasses.dataclass
class Draws:
    """The random numbers of one update, in the order ``CalQLAgent.losses`` consumes the torch RNG:
    the policy-loss action at s, n CQL actions at s, n CQL actions at s', the target actions at s',
    then the n uniform random actions."""

    new: torch.Tensor  # (B, A)
    cur: torch.Tensor  # (B, n, A)
    next: torch.Tensor  # (B, n, A)
    target: torch.Tensor  # (B, n_target, A)
    rand: torch.Tensor  # (B, n, A), U[-1, 1]

    @classmethod
    def replay(cls, seed: int, n: int, n_target: int) -> "Draws":
        torch.manual_seed(seed)
        new = torch.randn(B, ACT)
        cur = torch.randn(B, n, ACT)
        nxt = torch.randn(B, n, ACT)
        target = torch.randn(B, n_target, ACT)
        rand = torch.empty(B * n, ACT).uniform_(-1.0, 1.0).view(B, n, ACT)
        return cls(new, cur, nxt, target, rand)


def reference_losses(agent: CalQLAgent, batch: Batch, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Each official loss on its own, built with full autograd graphs (the official code then takes
    the gradient of each loss w.r.t. its own parameters only: value_and_multi_grad, line 318)."""
    cfg, n, E = agent.cfg, agent.cfg.cql_n_actions, agent.critic.num_critics
    n_target = n if cfg.cql_max_target_backup else 1
    draws = Draws.replay(seed, n, n_target)
    mu, sd = agent.normalizer.mean, agent.normalizer.std
    obs, next_obs = (batch.obs - mu) / sd, (batch.next_obs - mu) / sd
    policy, critic, target = agent.policy, agent.critic, agent.target_critic

    # Temperature: line 156 (alpha loss) and 158 (alpha = exp(log_alpha) * alpha_multiplier).
    new_action, log_pi = sample(policy, obs, draws.new)
    alpha = torch.exp(agent.log_alpha) * cfg.alpha_multiplier
    alpha_loss = -agent.log_alpha * (log_pi + agent.target_entropy).mean()

    # Policy loss, lines 164-168: alpha * log_pi - min(Q1, Q2) at a ~ pi(s).
    q_new = torch.stack([torch.stack([q_value(critic, e, obs[b], new_action[b]) for e in range(E)]).min() for b in range(B)])
    policy_loss = (alpha.detach() * log_pi - q_new).mean()  # alpha enters as a constant (grads go to the policy)

    # Target, lines 176-201: n' actions at s', min over the target critics, max over the actions,
    # the log-prob at the argmax; y = r + gamma (1 - done) (Q' - alpha log pi if backup_entropy).
    y = []
    with torch.no_grad():
        for b in range(B):
            values, log_probs = [], []
            for j in range(n_target):
                a, lp = sample(policy, next_obs[b : b + 1], draws.target[b, j][None])
                values.append(min(q_value(target, e, next_obs[b], a[0]) for e in range(E)))
                log_probs.append(lp[0])
            best = max(range(n_target), key=lambda j: values[j])
            backup = values[best] - (alpha * log_probs[best] if cfg.backup_entropy else 0.0)
            y.append(batch.reward[b] + (1.0 - batch.terminated[b]) * cfg.discount * backup)
    y = torch.stack(y)

    # CQL actions: at s and at s' (lines 208-218); all Q-values are taken at s (lines 220-225).
    cur = [sample(policy, obs[b : b + 1].expand(n, -1), draws.cur[b]) for b in range(B)]
    nxt = [sample(policy, next_obs[b : b + 1].expand(n, -1), draws.next[b]) for b in range(B)]
    td, gaps = [], []
    for e in range(E):
        q_data = torch.stack([q_value(critic, e, obs[b], batch.action[b]) for b in range(B)])
        td.append(((q_data - y) ** 2).mean())  # mse_loss, lines 202-203
        diffs = []
        for b in range(B):
            q_rand = q_value(critic, e, obs[b], draws.rand[b])  # (n,): the n actions of state b
            q_cur = q_value(critic, e, obs[b], cur[b][0])
            q_next = q_value(critic, e, obs[b], nxt[b][0])
            if cfg.calibrated:  # lines 236-240: policy actions only, before importance sampling
                q_cur = torch.maximum(q_cur, batch.mc_return[b])
                q_next = torch.maximum(q_next, batch.mc_return[b])
            if cfg.cql_importance_sample:  # lines 252-265
                random_density = math.log(0.5**ACT)
                cat = torch.cat([q_rand - random_density, q_next - nxt[b][1], q_cur - cur[b][1]])
            else:  # lines 243-248
                cat = torch.cat([q_rand, q_data[b][None], q_next, q_cur])
            ood = torch.logsumexp(cat / cfg.cql_temp, dim=0) * cfg.cql_temp  # lines 267-274
            diffs.append(torch.clamp(ood - q_data[b], cfg.cql_clip_diff_min, cfg.cql_clip_diff_max))
        gaps.append(torch.stack(diffs).mean())  # lines 277-286
    td, gaps = torch.stack(td), torch.stack(gaps)

    if cfg.cql_lagrange:  # lines 288-298
        alpha_prime = torch.clamp(torch.exp(agent.log_alpha_prime), 0.0, 1e6)
        cql_min_q = alpha_prime * cfg.cql_alpha * (gaps - cfg.cql_target_action_gap)
        alpha_prime_loss = (-cql_min_q[0] - cql_min_q[1]) * 0.5
        critic_cql = alpha_prime.detach() * cfg.cql_alpha * (gaps - cfg.cql_target_action_gap)
    else:  # lines 300-304
        alpha_prime_loss = torch.zeros(())
        critic_cql = gaps * cfg.cql_alpha
    return {
        "policy_loss": policy_loss,
        "alpha_loss": alpha_loss,
        "critic_loss": (td + critic_cql).sum(),  # qf1_loss + qf2_loss: each reaches its own critic only
        "alpha_prime_loss": alpha_prime_loss,
        "td_loss": td.mean(),
        "cql_gap": gaps.mean(),
        "gaps": gaps,
        "log_pi": log_pi,
        "y": y,
    }


def fused_grads(agent: CalQLAgent, batch: Batch, seed: int = SEED) -> tuple[torch.Tensor, dict, dict]:
    """The code's summed loss, its metrics, and the gradient it leaves on each parameter."""
    for p in agent.parameters():
        p.grad = None
    total, metrics = code_losses(agent, batch, seed)
    total.backward()
    return total, metrics, {name: p.grad for name, p in agent.named_parameters()}


def close(actual, expected, rtol=1e-4, atol=1e-5, msg=""):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected).detach(), rtol=rtol, atol=atol, msg=msg)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "algo",
    [
        {},
        {"cql_lagrange": True, "backup_entropy": True},
        {"cql_max_target_backup": False, "cql_importance_sample": False, "calibrated": False},
    ],
    ids=["default", "lagrange-backup-entropy", "plain-cql-single-target"],
)
def test_reference_replays_the_update_exactly(algo):
    """The whole objective, loss by loss: conservative_sac.py lines 152-315 against losses()."""
    agent = make_agent(**algo)
    batch = make_batch()
    total, metrics = code_losses(agent, batch)
    ref = reference_losses(agent, batch)
    close(metrics["policy_loss"], ref["policy_loss"], msg="policy loss (or the RNG replay is out of sync)")
    close(metrics["td_loss"], ref["td_loss"], msg="TD loss")
    close(metrics["cql_gap"], ref["cql_gap"], msg="CQL gap")
    close(metrics["critic_loss"], ref["critic_loss"], msg="critic loss")
    close(total, ref["policy_loss"] + ref["critic_loss"] + ref["alpha_loss"] + ref["alpha_prime_loss"], msg="total")


@pytest.mark.parametrize("backup_entropy", [False, True])
@pytest.mark.parametrize("max_backup", [True, False])
def test_target_backup_matches_a_hand_computation(max_backup, backup_entropy):
    """Lines 176-201: for each of 10 next actions the min over the target critics, the max over the
    actions, next_log_pi gathered at that argmax (backup_entropy: minus alpha times it),
    y = r + gamma * (1 - done) * that. The TD loss and its critic gradient depend on every y."""
    agent = make_agent(cql_alpha=0.0, cql_max_target_backup=max_backup, backup_entropy=backup_entropy)
    batch = make_batch()
    _, metrics, grads = fused_grads(agent, batch)
    ref = reference_losses(agent, batch)
    close(metrics["td_loss"], ref["td_loss"], rtol=1e-5, msg="TD loss")
    # With cql_alpha = 0 the critic loss is the TD loss alone: its gradient is 2/B sum_b (Q - y_b) dQ.
    critic_params = list(agent.critic.parameters())
    for got, want in zip([grads[f"critic.{k}"] for k, _ in agent.critic.named_parameters()],
                         torch.autograd.grad(ref["critic_loss"], critic_params)):  # fmt: skip
        close(got, want, msg="critic gradient of the TD loss")
    # The argmax matters: the max-over-actions target differs from a single action's, and from the
    # target built from the online critics (a different network here).
    if max_backup:
        y_first = []
        with torch.no_grad():
            draws = Draws.replay(SEED, N, N)
            next_obs = agent.normalizer(batch.next_obs)
            for b in range(B):
                a, _ = sample(agent.policy, next_obs[b : b + 1], draws.target[b, 0][None])
                y_first.append(min(q_value(agent.target_critic, e, next_obs[b], a[0]) for e in range(2)))
        assert (ref["y"] - batch.reward).abs().max() > 0.05  # the bootstrap term is not negligible
        assert not torch.allclose(torch.stack(y_first), ref["y"])


def test_terminal_transitions_do_not_bootstrap():
    """Line 200: (1 - dones) masks the bootstrap, so an all-terminal batch regresses onto the reward."""
    agent = make_agent(cql_alpha=0.0, backup_entropy=True)
    batch = make_batch(terminated=torch.ones(B))
    _, metrics = code_losses(agent, batch)
    obs = agent.normalizer(batch.obs)
    with torch.no_grad():
        td = [torch.stack([(q_value(agent.critic, e, obs[b], batch.action[b]) - batch.reward[b]) ** 2 for b in range(B)]).mean() for e in range(2)]
    close(metrics["td_loss"], torch.stack(td).mean(), rtol=1e-5)


def test_alpha_starts_at_one_and_its_loss_has_the_official_sign():
    """Line 99: log_alpha = Scalar(0.0); line 156: alpha_loss = -log_alpha * (log_pi + target_entropy);
    line 158: alpha = exp(log_alpha) * alpha_multiplier. Gradient descent on it lowers alpha while the
    policy's entropy -log_pi is above the target -|A|, and raises it below."""
    agent = make_agent()
    assert agent.log_alpha.item() == 0.0 and agent.target_entropy == -ACT
    batch = make_batch()
    _, metrics, grads = fused_grads(agent, batch)
    ref = reference_losses(agent, batch)
    assert metrics["alpha"].item() == 1.0
    expected = -(ref["log_pi"].mean() + agent.target_entropy)  # d alpha_loss / d log_alpha
    close(grads["log_alpha"], expected, rtol=1e-5, atol=1e-6)
    # With a target entropy far above / below the policy's, the gradient has the matching sign.
    for target_entropy, sign in [(100.0, -1.0), (-100.0, 1.0)]:
        agent.target_entropy = target_entropy
        _, _, grads = fused_grads(agent, batch)
        assert sign * grads["log_alpha"].item() > 50.0, (target_entropy, grads["log_alpha"])


def test_alpha_prime_starts_at_e_and_its_loss_has_the_official_sign():
    """Line 108: log_alpha_prime = Scalar(1.0) (alpha' = e); lines 289-296: alpha' = clip(exp(.), 0, 1e6),
    alpha_prime_loss = -(alpha' * w * (gap_1 - tau) + alpha' * w * (gap_2 - tau)) / 2, so alpha' grows
    while the gap exceeds the target gap tau and shrinks below it."""
    for tau, sign in [(0.8, -1.0), (1e4, 1.0)]:  # the gap here is O(10): above 0.8, far below 1e4
        agent = make_agent(cql_lagrange=True, cql_alpha=5.0, cql_target_action_gap=tau)
        assert agent.log_alpha_prime.item() == 1.0
        batch = make_batch()
        _, metrics, grads = fused_grads(agent, batch)
        ref = reference_losses(agent, batch)
        close(metrics["alpha_prime"], math.e, rtol=1e-6, atol=0)
        expected = -math.e * 5.0 * (ref["gaps"] - tau).mean()  # d alpha_prime_loss / d log_alpha_prime
        close(grads["log_alpha_prime"], expected, rtol=1e-4, atol=1e-5)
        assert sign * grads["log_alpha_prime"].item() > 0


def test_alpha_prime_is_clipped_at_1e6_and_then_gets_no_gradient():
    """Lines 289-292: jnp.clip(exp(log_alpha_prime), 0, 1e6); outside the range the clip's gradient is 0."""
    agent = make_agent(cql_lagrange=True)
    with torch.no_grad():
        agent.log_alpha_prime.fill_(20.0)  # e^20 ~ 4.9e8
    _, metrics, grads = fused_grads(agent, make_batch())
    assert metrics["alpha_prime"].item() == 1e6
    assert grads["log_alpha_prime"].item() == 0.0


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    """model.py:128-145: a = tanh(u), u ~ N(mean, exp(clip(mult * raw + offset, -20, 2))), log-prob of
    Transformed(MultivariateNormalDiag, Block(Tanh)); actions stay in (-1, 1), no rescaling."""
    torch.manual_seed(0)
    policy = TanhGaussianPolicy(OBS, ACT, [16, 16], log_std_multiplier=1.5, log_std_offset=-0.5)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(64, OBS)
    noise = torch.randn(64, ACT)
    mean, std, dist, tanh = tanh_gaussian(policy, obs)
    want_action = tanh(mean + std * noise)
    want_log_prob = dist.log_prob(want_action)

    # A given noise (the ONNX/actor path).
    action, log_prob = policy.action_from_noise(obs, noise)
    close(action, want_action, rtol=1e-6, atol=1e-6)
    close(log_prob, want_log_prob, rtol=1e-5, atol=1e-4)
    assert action.abs().max() <= 1.0  # in the tanh range: no rescaling to env units here

    # Sampling n per state (the CQL path): row b * n + j is state b's j-th draw.
    torch.manual_seed(5)
    got_a, got_lp = sample_tanh_gaussian(*policy.mean_and_log_std(obs), n=4)
    torch.manual_seed(5)
    noise_n = torch.randn(64, 4, ACT)
    mean, std, dist, tanh = tanh_gaussian(policy, obs[:, None].expand(-1, 4, -1))
    want_a = tanh(mean + std * noise_n)
    close(got_a, want_a.reshape(-1, ACT), rtol=1e-6, atol=1e-6)
    close(got_lp, dist.log_prob(want_a).reshape(-1), rtol=1e-5, atol=1e-4)

    # Log-prob of a given (dataset) action, away from the saturated ends, in float64.
    p64 = TanhGaussianPolicy(OBS, ACT, [16, 16]).double()
    p64.load_state_dict(policy.state_dict())
    data_action = (torch.rand(64, ACT, dtype=torch.float64) * 2 - 1) * 0.95
    _, _, dist64, _ = tanh_gaussian(p64, obs.double())
    close(p64.log_prob(obs.double(), data_action), dist64.log_prob(data_action), rtol=1e-9, atol=1e-9)


def test_tanh_gaussian_log_std_is_clipped_to_the_official_range():
    """model.py:121: log_std clipped to [-20, 2] before exp (a huge multiplier hits both ends)."""
    torch.manual_seed(0)
    policy = TanhGaussianPolicy(OBS, ACT, [16, 16], log_std_multiplier=1e4, log_std_offset=0.0).double()
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(64, OBS, dtype=torch.float64)
    _, log_std = policy.mean_and_log_std(obs)
    assert (log_std == 2.0).any() and (log_std == -20.0).any()
    noise = torch.randn(64, ACT, dtype=torch.float64) * 0.1
    mean, std, dist, tanh = tanh_gaussian(policy, obs)
    _, log_prob = policy.action_from_noise(obs, noise)
    pre = mean + std * noise
    ok = pre.abs().max(dim=-1).values < 5  # away from tanh saturation, where float64 is still exact
    assert ok.sum() > 10
    close(log_prob[ok], dist.log_prob(tanh(pre))[ok], rtol=1e-9, atol=1e-9)
