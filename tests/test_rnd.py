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
