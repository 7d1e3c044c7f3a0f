"""Where the exploration bonuses enter the Cal-QL agent: inside the TD target only.

RND: y = r + beta * r_int(s') + gamma (1 - d) Q' (OOO); the policy loss and the Cal-QL bound never
see it. SERA: r + lambda * r_int over the batch (centred) or its online rows, from the frozen pretrained agent.
Checked against the same agent without the bonus, fed the bonus by hand in its rewards.
"""

import dataclasses

import pytest
import torch

from o2o.learner.bonus import Bonus
from o2o.learner.buffer import Batch
from o2o.learner.calql import CalQLAgent
from o2o.learner.checkpoint import AgentSpec, load_checkpoint, save_checkpoint
from o2o.learner.config import CalQLConfig, NetworkConfig
from o2o.learner.sera import vcse_bonus

OBS, ACT, B = 6, 2, 64
NET = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32], rnd_hidden=[32, 32], rnd_features=16)


def batch(online_rows: int = 0, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(B, OBS, generator=g), action=torch.rand(B, ACT, generator=g) * 2 - 1,
        reward=torch.rand(B, generator=g), next_obs=torch.randn(B, OBS, generator=g),
        terminated=(torch.rand(B, generator=g) < 0.2).float(), mc_return=torch.randn(B, generator=g),
        online_rows=online_rows,
    )  # fmt: skip


def twins(**algo) -> tuple[CalQLAgent, CalQLAgent]:
    """An agent with the bonus and one without, with the same networks."""
    torch.manual_seed(0)
    with_bonus = CalQLAgent(OBS, ACT, CalQLConfig(**algo), NET)
    plain = CalQLAgent(OBS, ACT, CalQLConfig(**{**algo, "rnd": False, "sera": False}), NET)
    plain.load_state_dict({k: v for k, v in with_bonus.state_dict().items() if not k.startswith(("rnd.", "sera."))})
    return with_bonus, plain


def losses(agent: CalQLAgent, b: Batch) -> dict:
    torch.manual_seed(1)  # the same sampled actions for both agents
    return agent.losses(b)[1]


def test_rnd_bonus_enters_the_td_target_only():
    with_rnd, plain = twins(rnd=True, rnd_coef=10.0)
    b = batch()
    bonus = with_rnd.rnd.bonus(b.next_obs)
    assert bonus.abs().sum() > 0
    by_hand = dataclasses.replace(b, reward=b.reward + 10.0 * bonus)
    got, expected = losses(with_rnd, b), losses(plain, by_hand)
    torch.testing.assert_close(got["td_loss"], expected["td_loss"])
    # The policy loss and the Cal-QL bound (the MC return) are untouched by the bonus.
    torch.testing.assert_close(got["policy_loss"], losses(plain, b)["policy_loss"])
    torch.testing.assert_close(got["bound_rate"], losses(plain, b)["bound_rate"])
    assert not torch.allclose(got["td_loss"], losses(plain, b)["td_loss"])


def sera_by_hand(agent: CalQLAgent, obs: torch.Tensor, k: int) -> torch.Tensor:
    """VCSE's bonus computed apart from SeraBonus: normalised obs, v = min Q(s, tanh(policy mean)) of
    the agent as it was frozen, standardised; the kNN on obs / dim (vcse_bonus is checked against a
    slow double loop in test_sera.py)."""
    with torch.no_grad():
        x = (obs - agent.normalizer.mean) / agent.normalizer.std
        mean, _ = agent.sera.policy.mean_and_log_std(x)
        v = agent.sera.critic(x, torch.tanh(mean)).min(dim=0).values
        v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
        return vcse_bonus(x / x.shape[-1], v, k)


def test_sera_bonus_over_the_whole_batch_centred_by_default_on_normalised_observations():
    agent, plain = twins(sera=True, sera_coef=1.0, sera_k=5)
    agent.normalizer.set_statistics(torch.full((OBS,), 5.0), torch.full((OBS,), 3.0))  # not the identity
    plain.normalizer.load_state_dict(agent.normalizer.state_dict())
    agent.sera.freeze(agent.critic, agent.policy)
    b = batch(online_rows=24)
    b = dataclasses.replace(b, obs=5.0 + 3.0 * b.obs)
    bonus, metrics = agent.intrinsic_reward(b)
    raw = sera_by_hand(agent, b.obs, 5)
    torch.testing.assert_close(bonus, raw - raw.mean())  # every row, offline ones too; mean zero
    torch.testing.assert_close(metrics["sera_bonus"], (raw - raw.mean())[-24:].mean())
    by_hand = dataclasses.replace(b, reward=b.reward + bonus)
    torch.testing.assert_close(losses(agent, b)["td_loss"], losses(plain, by_hand)["td_loss"])
    # Training moves the critic and the policy, not SERA's frozen copies.
    for _ in range(5):
        agent.update(b)
    torch.testing.assert_close(agent.intrinsic_reward(b)[0], bonus)


def test_sera_on_online_rows_only_is_a_setting():
    agent, _ = twins(sera=True, sera_k=5, sera_rows="online", sera_center=False)
    agent.sera.freeze(agent.critic, agent.policy)
    b = batch(online_rows=24)
    bonus, _ = agent.intrinsic_reward(b)
    assert torch.equal(bonus[:40], torch.zeros(40))  # offline rows: none
    torch.testing.assert_close(bonus[40:], sera_by_hand(agent, b.obs[40:], 5))  # the kNN over the online rows alone
    assert agent.intrinsic_reward(batch(online_rows=0))[0] == 0.0  # no online rows: no bonus at all


def chain_q(bonus_go: float, bonus_stay: float, gamma: float = 0.99) -> tuple[float, float]:
    """Q of a two-state chain by value iteration: from s0, `go` ends the episode with reward 1,
    `stay` returns to s0 with reward 0; each gets its (mean) bonus added to the reward."""
    q_go = q_stay = 0.0
    for _ in range(20_000):
        q_go, q_stay = 1.0 + bonus_go, bonus_stay + gamma * max(q_go, q_stay)
    return q_go, q_stay


def chain_bonuses(**sera) -> tuple[float, float]:
    """The mean SERA bonus of the chain's `go` and `stay` rows over many batches (what Q-learning
    averages), from the real agent. s0 is a cloud of nearby states; offline and online rows alike."""
    torch.manual_seed(0)
    agent = CalQLAgent(4, 1, CalQLConfig(sera=True, sera_k=10, **sera), NET)
    agent.sera.freeze(agent.critic, agent.policy)
    g = torch.Generator().manual_seed(0)
    go, stay = [], []
    for _ in range(400):
        n = 128
        action = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).unsqueeze(1)  # even rows go, odd rows stay
        b = Batch(obs=torch.randn(n, 4, generator=g), action=action, reward=(action[:, 0] > 0).float(),
                  next_obs=torch.randn(n, 4, generator=g), terminated=(action[:, 0] > 0).float(),
                  mc_return=torch.zeros(n), online_rows=64)  # fmt: skip
        bonus, _ = agent.intrinsic_reward(b)
        go.append(bonus[0::2].mean())
        stay.append(bonus[1::2].mean())
    return float(torch.stack(go).mean()), float(torch.stack(stay).mean())


def test_sera_leaves_the_preference_for_reaching_the_goal_intact():
    """Issue 18: a bonus that pays more for not finishing than the task pays for finishing is a defect."""
    q_go, q_stay = chain_q(*chain_bonuses())  # the defaults: whole batch, centred
    assert q_go > q_stay
    # The earlier wiring (online rows only, the raw VCSE bonus, positive on every row) preferred never finishing.
    raw_go, raw_stay = chain_bonuses(sera_rows="online", sera_center=False, sera_condition="q_data")
    assert raw_stay > 0.1  # a living bonus: paid on every step that does not finish
    q_go, q_stay = chain_q(raw_go, raw_stay)
    assert q_stay > q_go


def test_rnd_trains_with_every_update_and_resumes_from_a_checkpoint(tmp_path):
    algo = CalQLConfig(rnd=True, sera=True, sera_k=5)
    spec = AgentSpec("pointmaze-umaze", OBS, ACT, [-1.0] * ACT, [1.0] * ACT, dataclasses.asdict(algo), dataclasses.asdict(NET))
    agent = spec.build_agent()
    agent.sera.freeze(agent.critic, agent.policy)
    b = batch(online_rows=32)
    predictor = [w.clone() for w in agent.rnd.predictor.parameters()]
    target = [w.clone() for w in agent.rnd.target.parameters()]
    for _ in range(50):
        metrics = agent.update(b)
    assert "rnd_loss" in metrics and "sera_bonus" in metrics
    # RND trains with each of the agent's updates (its statistics saw every batch); its target never.
    assert agent.rnd.obs_rms.count.item() == pytest.approx(50 * B, abs=1e-3)
    assert all(not torch.equal(a, w) for a, w in zip(predictor, agent.rnd.predictor.parameters()))
    assert all(torch.equal(a, w) for a, w in zip(target, agent.rnd.target.parameters()))
    save_checkpoint(tmp_path / "checkpoint.pt", agent, spec, 50)
    resumed, _, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    torch.testing.assert_close(resumed.rnd.bonus(b.next_obs), agent.rnd.bonus(b.next_obs))
    torch.testing.assert_close(resumed.sera(b.obs, b.action), agent.sera(b.obs, b.action))
    assert resumed.rnd.optimizer.state_dict()["state"][0]["step"] == agent.rnd.optimizer.state_dict()["state"][0]["step"]


def test_sera_needs_more_online_rows_than_k():
    from o2o.learner.sera import check_sera_batch

    check_sera_batch(256, 0.5, 10, "online")
    with pytest.raises(ValueError, match="more than algo.sera_k=10 online rows .* with offline_ratio=0.5 has 8"):
        check_sera_batch(16, 0.5, 10, "online")
    check_sera_batch(16, 0.5, 10, "batch")  # the whole batch counts
    with pytest.raises(ValueError, match="sera_rows"):
        check_sera_batch(256, 0.5, 10, "offline")


def test_critic_feature_norm_by_hand():
    from o2o.learner.networks import CriticEnsemble

    critic = CriticEnsemble(OBS, ACT, [8, 8], num_critics=2, feature_norm=True)
    obs, action = torch.randn(5, OBS), torch.rand(5, ACT)
    x = torch.cat([obs, action], -1)
    expected = []
    for i in range(2):  # an independent forward pass: ReLU layers, then x / max(||x||, 1e-8), then the head
        h = x
        for w, b_ in zip(list(critic.weights)[:-1], list(critic.biases)[:-1]):
            h = torch.relu(h @ w[i] + b_[i])
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        expected.append((h @ critic.weights[-1][i] + critic.biases[-1][i]).squeeze(-1))
    torch.testing.assert_close(critic(obs, action), torch.stack(expected))
    torch.testing.assert_close(critic.forward_per_state(obs, action.unsqueeze(1))[..., 0], torch.stack(expected))


class ConstantBonus(Bonus):
    """A third bonus, as a newcomer would add one: a constant reward on every row."""

    @classmethod
    def from_config(cls, obs_dim, action_dim, cfg, net, device):
        return cls()

    def reward(self, agent, batch):
        return torch.full_like(batch.reward, 0.5), {"constant_bonus": torch.tensor(0.5)}


@dataclasses.dataclass
class WithConstantBonus(CalQLConfig):
    constant: bool = dataclasses.field(default=True, metadata={"bonus": f"{__name__}:ConstantBonus"})


def test_a_third_bonus_is_one_class_and_one_config_field():
    torch.manual_seed(0)
    agent = CalQLAgent(OBS, ACT, WithConstantBonus(rnd=True, rnd_coef=10.0), NET)
    assert [b.name for b in agent.bonuses] == ["rnd", "constant"]  # in the order the fields are declared
    b = batch()
    bonus, metrics = agent.intrinsic_reward(b)
    torch.testing.assert_close(bonus, 10.0 * agent.rnd.bonus(b.next_obs) + 0.5)
    assert "constant_bonus" in agent.update(b) and "rnd_loss" in agent.update(b)


def test_bonus_weights_keep_their_checkpoint_keys(tmp_path):
    """Checkpoints written before the bonus interface hold ``rnd.*`` and ``sera.*``: they still load."""
    algo = CalQLConfig(rnd=True, sera=True, sera_k=5)
    agent = CalQLAgent(OBS, ACT, algo, NET)
    assert not any(k.startswith("sera.") for k in agent.state_dict())  # nothing frozen before fine-tuning
    agent.start_fine_tuning(B, 0.5, from_scratch=False)
    keys = agent.state_dict().keys()
    assert {k.split(".")[0] for k in keys if k.startswith(("rnd.", "sera."))} == {"rnd", "sera"}
    assert any(k.startswith("rnd.predictor.") for k in keys) and any(k.startswith("sera.critic.") for k in keys)
    assert "rnd_optimizer" in agent.training_state()
    # Turned off for a later run: the weights are not used, and said so.
    plain = CalQLAgent(OBS, ACT, CalQLConfig(), NET)
    notes = plain.load_training_state({**agent.training_state(), "optimizer": plain.optimizer.state_dict()})
    assert notes == ["the checkpoint's RND is not used (algo.rnd=false)",
                     "the checkpoint's SERA is not used (algo.sera=false)"]  # fmt: skip
