"""Cal-QL from pixels (learner/calql.py with an ObsSpec that has cameras): the critic loss trains the encoder,
the policy reads it detached, the target encoder follows by Polyak, obs and next_obs images get their own
random shifts, the bonuses see a fixed random encoder, and the ONNX policy takes the raw uint8 images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from user_files_guard import minari_datasets_at

from o2o.datasets.minari_io import DatasetError
from o2o.envs import get_task
from o2o.envs.obs_spec import CameraSpec, ObsSpec
from o2o.learner.buffer import Batch, TransitionBuffer
from o2o.learner.calql import CalQLAgent
from o2o.learner.checkpoint import AgentSpec, action_bounds, load_checkpoint, save_checkpoint
from o2o.learner.config import CalQLConfig, NetworkConfig, PretrainConfig
from o2o.learner.evaluation import evaluate
from o2o.learner.export_onnx import export_policy_verified
from o2o.learner.pixel_encoder import DRQ_PAD
from o2o.learner.sera import vcse_bonus
from o2o.learner.setup import load_offline_data, make_agent

NET = NetworkConfig(policy_hidden=[32, 32], critic_hidden=[32, 32])
SPEC = ObsSpec(2, (CameraSpec("top", 24, 24, 3),))
ACT = 2
PIXELS = "pointmaze-umaze-pixels"


def pixel_batch(n: int, seed: int = 0, spec: ObsSpec = SPEC) -> Batch:
    g = torch.Generator().manual_seed(seed)

    def images():
        return {c.name: torch.randint(0, 256, (n, *c.shape), generator=g, dtype=torch.uint8) for c in spec.cameras}

    return Batch(obs=torch.randn(n, spec.state_dim, generator=g), action=torch.rand(n, ACT, generator=g) * 2 - 1,
                 reward=torch.rand(n, generator=g), next_obs=torch.randn(n, spec.state_dim, generator=g),
                 terminated=torch.zeros(n), mc_return=torch.rand(n, generator=g), images=images(),
                 next_images=images())  # fmt: skip


def pixel_agent(seed: int = 0, **algo) -> CalQLAgent:
    torch.manual_seed(seed)
    return CalQLAgent(SPEC, ACT, CalQLConfig(**algo), NET)


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_one_update_trains_the_encoder_and_the_target_encoder_follows_by_polyak():
    agent = pixel_agent(tau=0.1)
    with torch.no_grad():  # a target encoder apart from the encoder, so the lerp is visible
        for p in agent.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoder, target = params(agent.encoder), params(agent.target_encoder)
    metrics = agent.update(pixel_batch(16))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    moved = params(agent.encoder)
    for name, before in encoder.items():
        assert not torch.equal(moved[name], before), f"encoder {name} did not train"
        # target <- target + tau (encoder - target), with the encoder as it is after the step
        expected = target[name] + 0.1 * (moved[name] - target[name])
        torch.testing.assert_close(dict(agent.target_encoder.named_parameters())[name].detach(), expected,
                                   rtol=0, atol=1e-6)  # fmt: skip


def test_the_encoder_learns_from_the_critic_loss_only():
    """The same update with the policy loss scaled by 0 gives the encoder the same gradient: all of it
    comes from the critic loss (and the policy's own gradient is not zero)."""
    batch = pixel_batch(16, seed=1)

    def gradients(policy_scale: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        agent = pixel_agent(seed=3)
        original = agent.policy_losses
        agent.policy_losses = lambda features: (lambda out: (out[0] * policy_scale, *out[1:]))(original(features))
        torch.manual_seed(7)  # the same sampled actions and shifts in both runs
        total, _ = agent.losses(batch)
        total.backward()
        return [p.grad.clone() for p in agent.encoder.parameters()], [p.grad for p in agent.policy.parameters()]

    encoder_all, policy_all = gradients(1.0)
    encoder_critic, policy_none = gradients(0.0)
    assert all(g.abs().sum() > 0 for g in encoder_all)
    for with_policy, critic_only in zip(encoder_all, encoder_critic):
        torch.testing.assert_close(with_policy, critic_only, rtol=0, atol=0)
    assert any(g is not None and g.abs().sum() > 0 for g in policy_all)


def test_the_policy_loss_moves_the_policy_and_never_the_encoder():
    agent = pixel_agent(seed=4)
    batch = pixel_batch(16, seed=4)
    features = agent.features(batch)[0]
    assert features.requires_grad  # the features carry the encoder's graph; the policy must cut it
    policy_loss = agent.policy_losses(features)[0]
    agent.optimizer.zero_grad(set_to_none=True)
    policy_loss.backward()
    assert all(p.grad is None for p in agent.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.policy.parameters())
    encoder, policy = params(agent.encoder), params(agent.policy)
    agent.optimizer.step()
    assert all(torch.equal(v, params(agent.encoder)[k]) for k, v in encoder.items())
    assert any(not torch.equal(v, params(agent.policy)[k]) for k, v in policy.items())


def test_encoding_in_cache_sized_chunks_gives_the_features_and_gradients_of_one_call():
    torch.manual_seed(11)
    spec = ObsSpec(2, (CameraSpec("front", 20, 18, 3), CameraSpec("wrist", 16, 16, 1)))
    agent = CalQLAgent(spec, ACT, CalQLConfig(), NET)
    batch = pixel_batch(20, seed=11, spec=spec)

    def encode(chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        agent.chunk_images = chunk
        agent.encoder.zero_grad(set_to_none=True)
        features = agent.encode(batch.obs, batch.images)
        (features * torch.arange(features.numel()).view_as(features).sin()).sum().backward()  # rows weigh differently
        return features.detach(), [p.grad.clone() for p in agent.encoder.parameters()]

    whole, whole_grads = encode(0)
    chunked, chunked_grads = encode(8)  # 8 + 8 + 4 images
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    maze = ObsSpec(2, (CameraSpec("top", 84, 84, 3),))
    assert CalQLAgent(maze, ACT, CalQLConfig(), NET).chunk_images == 64  # on a CPU; one call on a GPU


def position_frames(n: int, size: int = 24) -> torch.Tensor:
    """uint8 frames whose pixels say where they are: channel 0 the row, channel 1 the column, 2 the frame."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    frames = np.stack([np.stack([rows, cols, np.full_like(rows, i)], axis=-1) for i in range(n)])
    return torch.as_tensor(frames.astype(np.uint8))


def shifts_of(images: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """(dy, dx) of each image, checked to be a replicate-pad-4-and-crop of its original (DrQ)."""
    out = []
    for image, source in zip(images.numpy(), original.numpy()):
        dy, dx = int(image[12, 12, 0]) - 12, int(image[12, 12, 1]) - 12  # the centre pixel is never clamped
        padded = np.pad(source, ((DRQ_PAD, DRQ_PAD), (DRQ_PAD, DRQ_PAD), (0, 0)), mode="edge")
        assert abs(dy) <= DRQ_PAD and abs(dx) <= DRQ_PAD
        assert np.array_equal(image, padded[DRQ_PAD + dy : DRQ_PAD + dy + 24, DRQ_PAD + dx : DRQ_PAD + dx + 24])
        out.append((dy, dx))
    return np.array(out)


def test_obs_and_next_obs_images_get_their_own_random_shift_each_update():
    agent = pixel_agent(seed=5)
    frames = position_frames(64)
    batch = pixel_batch(64, seed=5)
    batch = Batch(**{**batch.__dict__, "images": {"top": frames}, "next_images": {"top": frames.clone()}})
    seen = {"encoder": [], "target": []}
    agent.encoder.pixels.register_forward_pre_hook(lambda m, args: seen["encoder"].append(args[0]["top"].clone()))
    agent.target_encoder.pixels.register_forward_pre_hook(lambda m, args: seen["target"].append(args[0]["top"].clone()))
    agent.update(batch)
    agent.update(batch)
    assert len(seen["encoder"]) == 4 and len(seen["target"]) == 2  # per update: s (trained), s' (policy); s' (target)
    obs_1, next_1, obs_2 = (shifts_of(seen["encoder"][i], frames) for i in (0, 1, 2))
    np.testing.assert_array_equal(shifts_of(seen["target"][0], frames), next_1)  # one shift of s' per update
    # Independent draws: obs and next_obs differ (each row matches by chance with p = 1/81), and anew per update.
    assert (obs_1 != next_1).any(axis=1).mean() > 0.9
    assert (obs_1 != obs_2).any(axis=1).mean() > 0.9
    assert len({tuple(s) for s in obs_1}) > 30
    assert torch.equal(batch.images["top"], frames)  # the batch itself is left as sampled


def test_the_bonuses_see_a_fixed_random_encoder_and_are_finite():
    agent = pixel_agent(seed=6, rnd=True, sera=True, sera_k=5, sera_center=False)
    batch = pixel_batch(32, seed=6)
    assert agent.bonus_encoder is not None and not any(p.requires_grad for p in agent.bonus_encoder.parameters())
    assert agent.rnd.predictor.weights[0].shape[0] == agent.bonus_encoder.out_dim == 50 + 2
    agent.start_fine_tuning(32, 0.5, from_scratch=False)  # SERA freezes its value networks, the encoder's copy too
    fixed, frozen = params(agent.bonus_encoder), {k: v.clone() for k, v in agent.sera.encoder.state_dict().items()}
    encoder = params(agent.encoder)

    with torch.no_grad():  # each bonus by hand, on the fixed encoder's features (pixels, then the state)
        seen_next = torch.cat([agent.bonus_encoder.pixels(batch.next_images), batch.next_obs], dim=1)
        rnd = agent.rnd.coef * agent.rnd.bonus(seen_next)
        state = agent.normalizer(batch.obs)
        seen = torch.cat([agent.bonus_encoder.pixels(batch.images), state], dim=1)
        value_features = agent.sera.encoder(state, batch.images)
        v = agent.sera.critic(value_features, agent.sera.policy.deterministic(value_features)).min(dim=0).values
        v = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
        sera = agent.sera.coef * vcse_bonus(seen / seen.shape[1], v, 5)
        total, _ = agent.intrinsic_reward(batch)
    torch.testing.assert_close(total, rnd + sera, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(total).all() and total.std() > 0

    for seed in range(3):
        metrics = agent.update(pixel_batch(32, seed=10 + seed))
        assert all(torch.isfinite(v).all() for v in metrics.values())
    assert all(torch.equal(v, params(agent.bonus_encoder)[k]) for k, v in fixed.items())
    assert all(torch.equal(v, agent.sera.encoder.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, params(agent.encoder)[k]) for k, v in encoder.items())  # while the critic's learns


def two_camera_spec() -> AgentSpec:
    return AgentSpec(task="two-cameras", obs_dim=3, action_dim=ACT, action_low=[-2.0, 0.0], action_high=[2.0, 1.0],
                     algo={}, net={"policy_hidden": [32, 32], "critic_hidden": [32, 32]},
                     cameras={"wrist": [16, 16, 1], "front": [20, 18, 3]})  # fmt: skip


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_the_onnx_policy_takes_raw_uint8_images_by_name_and_matches_torch(tmp_path, exporter):
    spec = two_camera_spec()
    torch.manual_seed(8)
    agent = spec.build_agent()
    agent.normalizer.set_statistics(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 3.0]))
    path, error = export_policy_verified(agent, spec, tmp_path / "policy.onnx", exporter=exporter)
    assert error <= 1e-5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == ["obs", "front", "wrist", "noise"]  # the cameras in name order
    assert [i.type for i in inputs] == ["tensor(float)", "tensor(uint8)", "tensor(uint8)", "tensor(float)"]
    assert inputs[1].shape[1:] == [20, 18, 3] and inputs[2].shape[1:] == [16, 16, 1]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["cameras"]) == {"front": [20, 18, 3], "wrist": [16, 16, 1]}
    assert json.loads(meta["input_names"]) == ["obs", "front", "wrist", "noise"] and meta["obs_dim"] == "3"

    rng = np.random.default_rng(0)
    for n in (1, 5):
        obs = rng.normal(size=(n, 3)).astype(np.float32)
        front = rng.integers(0, 256, (n, 20, 18, 3), dtype=np.uint8)
        wrist = rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)
        noise = rng.standard_normal((n, ACT)).astype(np.float32)
        noise[0] = 0.0
        (got,) = session.run(None, {"obs": obs, "front": front, "wrist": wrist, "noise": noise})
        with torch.no_grad():  # by hand: scaling and encoder on the raw images, the policy, the action box
            images = {"front": torch.from_numpy(front), "wrist": torch.from_numpy(wrist)}
            features = agent.encode(torch.from_numpy(obs), images)
            squashed, _ = agent.policy.action_from_noise(features, torch.from_numpy(noise))
        low, high = action_bounds(spec)
        np.testing.assert_allclose(got, low + (squashed.numpy() + 1) / 2 * (high - low), rtol=0, atol=1e-5)
    # The images matter: other frames from the front camera, another action.
    (other,) = session.run(None, {"obs": obs, "front": 255 - front, "wrist": wrist, "noise": noise})
    assert np.abs(other - got).max() > 1e-4


def test_a_state_policy_says_it_has_no_cameras(tmp_path):
    spec = AgentSpec(task="state", obs_dim=3, action_dim=ACT, action_low=[-1.0, -1.0], action_high=[1.0, 1.0],
                     algo={}, net={"policy_hidden": [8], "critic_hidden": [8]})  # fmt: skip
    path, _ = export_policy_verified(spec.build_agent(), spec, tmp_path / "policy.onnx", exporter="torchscript")
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["cameras"] == "{}" and json.loads(meta["input_names"]) == ["obs", "noise"]


def test_checkpoints_keep_the_encoders_and_state_agents_keep_their_keys(tmp_path):
    spec = AgentSpec(task="t", obs_dim=2, action_dim=ACT, action_low=[-1.0] * 2, action_high=[1.0] * 2,
                     algo={"rnd": True}, net={"policy_hidden": [32, 32], "critic_hidden": [32, 32]},
                     cameras={"top": [24, 24, 3]})  # fmt: skip
    torch.manual_seed(9)
    agent = spec.build_agent()
    agent.update(pixel_batch(8, seed=9))
    save_checkpoint(tmp_path / "checkpoint.pt", agent, spec, step=1)
    torch.manual_seed(10)  # another seed: every restored weight must come from the file
    loaded, loaded_spec, _ = load_checkpoint(tmp_path)
    assert loaded_spec.cameras == {"top": [24, 24, 3]} and loaded.obs_spec == SPEC
    saved = agent.state_dict()
    assert {k.split(".")[0] for k in saved} >= {"encoder", "target_encoder", "bonus_encoder"}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())
    # The subroutine's fine_tune mode continues from a retrained agent: its encoders come along.
    fresh = spec.build_agent()
    fresh.load_networks(loaded)
    for name in ("encoder", "target_encoder"):
        mine, theirs = getattr(fresh, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    # Fine-tuning without bonuses drops the fixed random encoder; with one on, a checkpoint without keeps a fresh one.
    plain, _, _ = load_checkpoint(tmp_path, algo={"rnd": False})
    assert plain.bonus_encoder is None and "bonus_encoder" not in {k.split(".")[0] for k in plain.state_dict()}
    state = CalQLAgent(2, ACT, CalQLConfig(), NET).state_dict()
    assert not {k.split(".")[0] for k in state} & {"encoder", "target_encoder", "bonus_encoder"}


def test_make_agent_trains_on_a_pixel_dataset_and_evaluates_in_its_env(tmp_path):
    task = get_task(PIXELS)
    cfg = PretrainConfig(task=PIXELS, dataset=f"o2o/{PIXELS}/mixed-v0", build_episodes=2, progress=False, net=NET)
    with minari_datasets_at(tmp_path / "minari"):
        data = load_offline_data(cfg, task)
    with pytest.raises(DatasetError, match=r"camera frames are none.*\{'top': \[48, 48, 3\]\}"):
        make_agent(cfg, task, dataclasses.replace(data, frames={}), "cpu")  # images the task has, the data lacks
    agent, spec = make_agent(cfg, task, data, "cpu")
    assert spec.cameras == {"top": [48, 48, 3]} and spec.obs_dim == data.obs_dim == 2
    assert agent.encoder is not None and agent.obs_spec.camera_names == ("top",)
    low, high = action_bounds(spec)
    batch = TransitionBuffer.from_transitions(data, low, high, "cpu").sample(16)
    assert batch.images["top"].dtype == torch.uint8 and batch.images["top"].shape == (16, 48, 48, 3)
    encoder = params(agent.encoder)
    metrics = agent.update(batch)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert any(not torch.equal(v, params(agent.encoder)[k]) for k, v in encoder.items())
    result = evaluate(agent, task, 1, seed=0, low=low, high=high)  # the torch policy on the env's Dict observations
    assert result["length"] > 0 and np.isfinite(result["return"])
