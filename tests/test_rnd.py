"""RND bonus (learner/rnd.py): learning, novelty, frozen target, running statistics, checkpoint.

Small networks (64x64, 32 features) keep the file to a few seconds on 2 CPU cores; the
statistics are checked against numpy over all the data fed, computed independently.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from o2o.learner.rnd import RND, RunningMeanStd

OBS = 5
SMALL = dict(hidden=[64, 64], features=32, lr=1e-3)


def states(rng: np.random.Generator, n: int, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.as_tensor(rng.normal(loc, scale, (n, OBS)), dtype=torch.float32)


@pytest.fixture
def rng():
    torch.manual_seed(0)
    return np.random.default_rng(0)


def raw_error(rnd: RND, x: torch.Tensor) -> torch.Tensor:
    """max_f (pred - target)^2 recomputed here from the nets and the stored statistics."""
    mean, std = rnd.obs_rms.mean.float(), rnd.obs_rms.var.sqrt().float()
    z = ((x - mean) / std).clamp(-5, 5)
    with torch.no_grad():
        return (rnd.predictor(z) - rnd.target(z)).square().amax(-1)


def test_bonus_falls_with_training_and_novel_states_score_higher(rng):
    rnd = RND(OBS, **SMALL)
    seen = states(rng, 256)
    for _ in range(5):  # settle the running statistics before the first measurement
        rnd.update(seen)
    before = rnd.bonus(seen).mean()
    raw_before = raw_error(rnd, seen).mean()
    for _ in range(200):
        rnd.update(seen)
    after = rnd.bonus(seen).mean()
    assert after < 0.5 * before, (before, after)
    assert raw_error(rnd, seen).mean() < 0.5 * raw_before
    # Far from the training states (4 std away, inside the +-5 clip): novel.
    far = states(rng, 256, loc=4.0, scale=0.5)
    assert rnd.bonus(far).median() > 3 * rnd.bonus(seen).median()
    # And held-out states from the same distribution score close to the trained ones, below the far ones.
    fresh = states(rng, 256)
    assert rnd.bonus(fresh).median() < rnd.bonus(far).median()


def test_bonus_is_max_squared_error_over_sqrt_bonus_variance(rng):
    rnd = RND(OBS, **SMALL)
    for _ in range(3):
        rnd.update(states(rng, 64))
    x = states(rng, 32)
    expected = raw_error(rnd, x) / rnd.bonus_rms.var.sqrt().float()
    torch.testing.assert_close(rnd.bonus(x), expected)
    # update() feeds the bonus statistics with the pre-step bonus of the same batch (OOO's order).
    bonus_rms = RunningMeanStd(())
    bonus_rms.load_state_dict(rnd.bonus_rms.state_dict())
    pre = rnd.bonus(x)
    metrics = rnd.update(x)
    bonus_rms.update(pre)
    torch.testing.assert_close(rnd.bonus_rms.var, bonus_rms.var)
    torch.testing.assert_close(metrics["rnd_bonus"], pre.mean())


def test_target_never_changes_and_only_predictor_trains(rng):
    rnd = RND(OBS, **SMALL)
    target0 = {k: v.clone() for k, v in rnd.target.state_dict().items()}
    predictor0 = {k: v.clone() for k, v in rnd.predictor.state_dict().items()}
    assert not any(p.requires_grad for p in rnd.target.parameters())
    assert all(p.requires_grad for p in rnd.predictor.parameters())
    for _ in range(20):
        rnd.update(states(rng, 64))
    for k, v in rnd.target.state_dict().items():
        assert torch.equal(v, target0[k]), k
    assert any(not torch.equal(v, predictor0[k]) for k, v in rnd.predictor.state_dict().items())
    assert all(k.startswith(("predictor.", "target.", "obs_rms.", "bonus_rms.")) for k in rnd.state_dict())
    assert any(k.startswith("target.") for k in rnd.state_dict())


def test_running_statistics_equal_numpy_over_all_data_fed(rng):
    rnd = RND(OBS, **SMALL)
    fed = []
    for i in range(30):
        x = states(rng, 16 + 7 * i, loc=np.linspace(-3, 3, OBS), scale=np.linspace(0.1, 4, OBS))
        fed.append(x.numpy().astype(np.float64))
        rnd.update(x)
    data = np.concatenate(fed)
    # numpy over all the data, with OOO's prior (mean 0, var 1, pseudo-count 1e-4) pooled in exactly:
    prior, n = 1e-4, len(data)
    mean = data.sum(0) / (n + prior)
    var = (prior * (1.0 + mean**2) + ((data - mean) ** 2).sum(0)) / (n + prior)
    np.testing.assert_allclose(rnd.obs_rms.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rnd.obs_rms.var.numpy(), var, rtol=1e-9)
    # ... which is numpy's plain mean / population variance to within the prior's weight.
    np.testing.assert_allclose(rnd.obs_rms.mean.numpy(), data.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rnd.obs_rms.var.numpy(), data.var(0), rtol=1e-4)
    assert rnd.obs_rms.count.item() == pytest.approx(len(data) + 1e-4)
    # With obs given, the statistics come from obs (OOO: batch["observations"]), not next_obs.
    obs = states(rng, 64, loc=2.0)
    rnd2 = RND(OBS, **SMALL)
    rnd2.update(states(rng, 64, loc=-2.0), obs=obs)
    np.testing.assert_allclose(rnd2.obs_rms.mean.numpy(), obs.numpy().mean(0) * 64 / (64 + 1e-4), rtol=1e-5)


def test_training_state_round_trip(rng):
    torch.manual_seed(1)
    rnd = RND(OBS, **SMALL)
    for _ in range(10):
        rnd.update(states(rng, 64))
    buffer = io.BytesIO()  # through bytes, as a checkpoint (an in-memory optimiser state would alias a's tensors)
    torch.save(rnd.training_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    torch.manual_seed(2)  # a different random target and predictor before loading
    other = RND(OBS, **SMALL)
    x = states(rng, 32)
    assert not torch.allclose(other.bonus(x), rnd.bonus(x))
    other.load_training_state(state)
    torch.testing.assert_close(other.bonus(x), rnd.bonus(x), rtol=0, atol=0)
    # The optimiser state came along too: the next step is the same on both.
    batch = states(rng, 64)
    torch.manual_seed(3)
    rnd.update(batch)
    torch.manual_seed(3)
    other.update(batch)
    torch.testing.assert_close(other.bonus(x), rnd.bonus(x), rtol=0, atol=0)


# Issue 18 part 6: what the agent feeds RND, the input clip and the predictor's row mask; each test
# was checked to fail with that behaviour broken (next_obs -> obs, no clip, every row trained).


def z_by_hand(rnd: RND, x: torch.Tensor) -> torch.Tensor:
    """The networks' input: (x - mean) / sqrt(var) with the stored statistics, clipped to [-5, 5]."""
    z = (x.to(torch.float64) - rnd.obs_rms.mean) / rnd.obs_rms.var.sqrt()
    return z.clamp(-5.0, 5.0).to(x.dtype)


def bonus_by_hand(rnd: RND, x: torch.Tensor) -> torch.Tensor:
    z = z_by_hand(rnd, x)
    with torch.no_grad():
        return (rnd.predictor(z) - rnd.target(z)).square().amax(-1) / rnd.bonus_rms.var.sqrt().float()


def row_gradients(rnd: RND, z: torch.Tensor) -> torch.Tensor:
    """(P, B): column i is the predictor's gradient of row i's loss, mean_f (pred(z_i) - target(z_i))^2."""
    params = list(rnd.predictor.parameters())
    with torch.no_grad():
        target = rnd.target(z)
    columns = []
    for i in range(len(z)):
        loss = (rnd.predictor(z[i : i + 1]) - target[i : i + 1]).square().mean()
        columns.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(columns, 1).to(torch.float64)


def record_gradients(rnd: RND) -> list[torch.Tensor]:
    """The predictor's gradient at each optimiser step (a step pre-hook: the gradient as the step sees it)."""
    seen: list[torch.Tensor] = []
    rnd.optimizer.register_step_pre_hook(
        lambda *_: seen.append(torch.cat([p.grad.flatten() for p in rnd.predictor.parameters()]).to(torch.float64))
    )
    return seen


def row_weights(rows: torch.Tensor, gradient: torch.Tensor) -> tuple[torch.Tensor, float]:
    """w with gradient = rows @ w (least squares, by the normal equations: the per-row gradients are
    independent), and the relative residual."""
    w = torch.linalg.solve(rows.T @ rows, rows.T @ gradient)
    return w, float((rows @ w - gradient).norm() / gradient.norm())


def test_agent_trains_rnd_on_next_obs_feeds_its_statistics_next_obs_and_its_td_target_the_next_obs_bonus():
    import dataclasses

    from o2o.learner.buffer import Batch
    from o2o.learner.calql import CalQLAgent
    from o2o.learner.config import CalQLConfig, NetworkConfig

    act, n = 2, 64
    net = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32], rnd_hidden=[32, 32], rnd_features=16)
    g = torch.Generator().manual_seed(0)

    def batch() -> Batch:  # s ~ 0, s' ~ 10: a bonus, a gradient or a mean from the wrong one is far off
        return Batch(obs=0.1 * torch.randn(n, OBS, generator=g), action=torch.rand(n, act, generator=g) * 2 - 1,
                     reward=torch.rand(n, generator=g), next_obs=10.0 + torch.randn(n, OBS, generator=g),
                     terminated=(torch.rand(n, generator=g) < 0.2).float(),
                     mc_return=torch.randn(n, generator=g))  # fmt: skip

    torch.manual_seed(0)
    agent = CalQLAgent(OBS, act, CalQLConfig(rnd=True, rnd_coef=10.0), net)
    fed = []
    for _ in range(3):  # settle the statistics, so that the next states' inputs are not all at the clip
        warm = batch()
        agent.update(warm)
        fed.append(warm.next_obs)
    # The observation statistics: every next state fed, the states never (s ~ 0, s' ~ 10).
    data = torch.cat(fed).double()
    torch.testing.assert_close(agent.rnd.obs_rms.mean, data.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(agent.rnd.obs_rms.var, data.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    plain = CalQLAgent(OBS, act, CalQLConfig(rnd=False), net)  # the same agent as it is now, without RND
    plain.load_state_dict({k: v for k, v in agent.state_dict().items() if not k.startswith("rnd.")})

    b = batch()
    rnd = agent.rnd
    expected = bonus_by_hand(rnd, b.next_obs)  # pre-step networks and statistics
    wrong = bonus_by_hand(rnd, b.obs)
    assert expected.std() > 0 and (expected - wrong).abs().mean() > 0.1 * expected.abs().mean()
    rows = row_gradients(rnd, z_by_hand(rnd, b.next_obs))
    gradients = record_gradients(rnd)
    torch.manual_seed(1)
    metrics = agent.update(b)
    fed.append(b.next_obs)

    # The TD target's bonus is beta * bonus(s'): the same TD loss as the agent without RND fed it by hand.
    torch.manual_seed(1)
    by_hand = plain.losses(dataclasses.replace(b, reward=b.reward + 10.0 * expected))[1]
    torch.testing.assert_close(metrics["td_loss"], by_hand["td_loss"])
    torch.manual_seed(1)
    assert not torch.allclose(plain.losses(dataclasses.replace(b, reward=b.reward + 10.0 * wrong))[1]["td_loss"],
                              metrics["td_loss"], rtol=1e-3)  # fmt: skip
    torch.testing.assert_close(metrics["rnd_bonus"], expected.mean())
    # The predictor's step: its gradient is a combination of the next states' row gradients only.
    (gradient,) = gradients
    _, residual = row_weights(rows, gradient)
    assert residual < 1e-4, residual
    # ... and still after this step.
    data = torch.cat(fed).double()
    torch.testing.assert_close(rnd.obs_rms.mean, data.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rnd.obs_rms.var, data.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    assert rnd.obs_rms.count.item() == pytest.approx(4 * n, abs=1e-3)


def test_far_out_of_distribution_inputs_reach_both_networks_clipped_to_5_std(rng):
    import copy

    rnd = RND(OBS, **SMALL)
    for _ in range(3):
        rnd.update(states(rng, 64, loc=np.linspace(-2, 2, OBS), scale=np.linspace(0.5, 3, OBS)))
    mean, std = rnd.obs_rms.mean.float(), rnd.obs_rms.var.sqrt().float()
    u = torch.as_tensor(rng.normal(0, 30, (64, OBS)), dtype=torch.float32)  # in std units: mostly beyond 5
    u[:, 0] = torch.linspace(-4.5, 4.5, 64)  # one feature inside the clip throughout
    far, at_clip = mean + std * u, mean + std * u.clamp(-5, 5)
    assert (u.abs() > 5).float().mean() > 0.7

    seen: dict[str, list[torch.Tensor]] = {"predictor": [], "target": []}
    for name in seen:
        net = getattr(rnd, name)
        net.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().clone()))
    z = z_by_hand(rnd, far)
    assert z.abs().max() == 5.0 and (z.abs() == 5.0).float().mean() > 0.7
    bonus = rnd.bonus(far)
    twin = copy.deepcopy(rnd)
    torch.manual_seed(4)
    rnd.update(far)
    for name, inputs in seen.items():  # bonus, then update: each network saw the clipped inputs
        assert len(inputs) == 2, name
        for x in inputs:
            torch.testing.assert_close(x, z)
    # So states that differ only beyond the clip score and train alike.
    torch.testing.assert_close(bonus, bonus_by_hand(twin, far))
    torch.testing.assert_close(bonus, twin.bonus(at_clip), rtol=1e-4, atol=1e-6)
    torch.manual_seed(4)
    twin.update(at_clip)
    for a, b in zip(rnd.predictor.parameters(), twin.predictor.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_predictor_trains_on_a_fresh_random_quarter_of_the_rows_equally_weighted(rng):
    rnd = RND(OBS, **SMALL)
    gradients = record_gradients(rnd)
    x = states(rng, 64, scale=2.0)
    masks = []
    for step in range(16):
        rows = row_gradients(rnd, z_by_hand(rnd, x))
        rnd.update(x)
        w, residual = row_weights(rows, gradients[step])
        assert residual < 1e-4, (step, residual)
        kept = w > 0.5 * w.max()
        # loss = sum over the kept rows of the row loss / their number: weights 1/k on k rows, 0 elsewhere.
        torch.testing.assert_close(w, kept.double() / kept.sum(), rtol=0, atol=1e-4)
        masks.append(kept)
    masks = torch.stack(masks)
    fraction = masks.double().mean().item()  # 1024 rows: Bernoulli(0.25) gives 0.25 +- 0.014
    assert 0.19 < fraction < 0.31, fraction
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)  # a new mask each step
    assert masks.any(0).float().mean() > 0.9  # ... over all the rows, not a fixed subset
