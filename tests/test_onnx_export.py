"""The exported ONNX policy: parity with torch in onnxruntime, names, metadata, bounds, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from o2o.learner import export_onnx
from o2o.learner.checkpoint import AgentSpec, save_checkpoint
from o2o.learner.export_onnx import (
    PARITY_TOLERANCE,
    OnnxExportError,
    export_policy,
    export_policy_verified,
    main,
    session_providers,
)
from o2o.learner.networks import TanhGaussianPolicy

OBS_DIM, ACTION_DIM = 7, 3
LOW = np.array([-2.0, -1.0, 0.0], np.float32)
HIGH = np.array([2.0, 1.0, 3.0], np.float32)
TOL = 1e-5


def make_spec() -> AgentSpec:
    return AgentSpec(
        task="test-task",
        obs_dim=OBS_DIM,
        action_dim=ACTION_DIM,
        action_low=LOW.tolist(),
        action_high=HIGH.tolist(),
        algo={},
        net={"policy_hidden": [256, 256], "critic_hidden": [32, 32]},
    )


def make_agent(spec: AgentSpec, seed: int = 0):
    """An agent whose normaliser and policy are far from their defaults (no optimiser involved)."""
    torch.manual_seed(seed)
    agent = spec.build_agent()
    agent.normalizer.set_statistics(torch.randn(OBS_DIM) * 3.0, torch.rand(OBS_DIM) * 5.0 + 0.1)
    with torch.no_grad():
        for w, b in zip(agent.policy.net.weights, agent.policy.net.biases):
            w.add_(0.2 * torch.randn_like(w))
            b.add_(0.1 * torch.randn_like(b))
        agent.policy.log_std_multiplier.fill_(0.5)
        agent.policy.log_std_offset.fill_(-0.5)
    return agent


def rescale(squashed: torch.Tensor) -> np.ndarray:
    return (LOW + (squashed.numpy() + 1.0) / 2.0 * (HIGH - LOW)).astype(np.float32)


def sample_obs(agent, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    unit = torch.randn(n, OBS_DIM, generator=g)
    return (agent.normalizer.mean + agent.normalizer.std * unit).numpy().astype(np.float32)


def run(session: ort.InferenceSession, obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
    (action,) = session.run(["action"], {"obs": obs, "noise": noise})
    return action


@pytest.fixture(scope="module")
def spec():
    return make_spec()


@pytest.fixture(scope="module")
def agent(spec):
    return make_agent(spec)


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def exported(request, tmp_path_factory, agent, spec):
    path = tmp_path_factory.mktemp(request.param) / "policy.onnx"
    written, _ = export_policy_verified(agent, spec, path, version=4, step=1234, exporter=request.param)
    assert written == path and path.is_file()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, session


@pytest.mark.parametrize("batch", [1, 37])
def test_zero_noise_gives_the_deterministic_action(exported, agent, batch):
    _, session = exported
    obs = sample_obs(agent, batch, seed=batch)
    got = run(session, obs, np.zeros((batch, ACTION_DIM), np.float32))
    with torch.no_grad():
        expected = rescale(agent.policy.deterministic(agent.normalizer(torch.from_numpy(obs))))
    assert got.shape == (batch, ACTION_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    # The perturbed policy is not trivially at the middle of the action box.
    assert np.abs(expected - (LOW + HIGH) / 2).max() > 0.1


@pytest.mark.parametrize("batch", [1, 37])
def test_random_noise_matches_action_from_noise(exported, agent, batch):
    _, session = exported
    obs = sample_obs(agent, batch, seed=100 + batch)
    noise = np.random.default_rng(batch).standard_normal((batch, ACTION_DIM)).astype(np.float32)
    got = run(session, obs, noise)
    with torch.no_grad():
        squashed, _ = agent.policy.action_from_noise(agent.normalizer(torch.from_numpy(obs)), torch.from_numpy(noise))
    np.testing.assert_allclose(got, rescale(squashed), rtol=0, atol=TOL)
    # Noise moves the action: the graph really uses its noise input.
    deterministic = run(session, obs, np.zeros_like(noise))
    assert np.abs(got - deterministic).max() > 1e-3


def test_actions_stay_in_bounds_and_span_the_asymmetric_box(exported, agent):
    _, session = exported
    n = 200
    obs = sample_obs(agent, n, seed=7)
    noise = 3.0 * np.random.default_rng(7).standard_normal((n, ACTION_DIM)).astype(np.float32)
    actions = run(session, obs, noise)
    assert np.all(actions >= LOW - 1e-6) and np.all(actions <= HIGH + 1e-6)
    # Saturating noise drives tanh to -1 / +1: the output lands on low / high, per dimension.
    huge = np.full((n, ACTION_DIM), 1e4, np.float32)
    np.testing.assert_allclose(run(session, obs, -huge), np.broadcast_to(LOW, (n, ACTION_DIM)), atol=TOL)
    np.testing.assert_allclose(run(session, obs, huge), np.broadcast_to(HIGH, (n, ACTION_DIM)), atol=TOL)


def test_names_dynamic_batch_axis_and_opset(exported):
    path, session = exported
    assert [i.name for i in session.get_inputs()] == ["obs", "noise"]
    assert [o.name for o in session.get_outputs()] == ["action"]
    for arg, width in [(session.get_inputs()[0], OBS_DIM), (session.get_inputs()[1], ACTION_DIM), (session.get_outputs()[0], ACTION_DIM)]:
        assert arg.type == "tensor(float)"
        assert isinstance(arg.shape[0], str) and arg.shape[1] == width  # symbolic batch, fixed width
    model = onnx.load(str(path))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    # The sampling head is gone: no random op, and nothing of the log-prob (softplus) left.
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"RandomNormal", "RandomNormalLike", "RandomUniform", "Softplus"}


def test_metadata_readable_without_torch(exported):
    _, session = exported
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["o2o_format_version"] == "1"
    assert meta["task"] == "test-task"
    assert int(meta["obs_dim"]) == OBS_DIM and int(meta["action_dim"]) == ACTION_DIM
    assert json.loads(meta["action_low"]) == LOW.tolist()
    assert json.loads(meta["action_high"]) == HIGH.tolist()
    assert int(meta["policy_version"]) == 4 and int(meta["training_step"]) == 1234
    assert json.loads(meta["input_names"]) == ["obs", "noise"]
    assert json.loads(meta["output_names"]) == ["action"]
    assert meta["noise"] == "standard_normal"


def test_session_providers_run_the_policy(exported, agent):
    path, _ = exported
    providers = session_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == ("CUDAExecutionProvider" in ort.get_available_providers())
    session = ort.InferenceSession(str(path), providers=providers)
    obs = sample_obs(agent, 5, seed=3)
    assert run(session, obs, np.zeros((5, ACTION_DIM), np.float32)).shape == (5, ACTION_DIM)


def test_export_unwraps_compiled_modules_and_leaves_the_agent_alone(tmp_path, spec):
    agent = make_agent(spec, seed=1)
    raw_policy = agent.policy
    agent.policy = torch.compile(raw_policy, backend="eager")  # a wrapper; nothing compiles unless called
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    path = export_policy(agent, spec, tmp_path / "policy.onnx", exporter="torchscript")

    assert agent.policy.training and all(p.requires_grad for p in raw_policy.parameters())
    assert all(torch.equal(before[k], v) for k, v in agent.state_dict().items())
    obs = sample_obs(agent, 9, seed=9)
    got = run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), obs, np.zeros((9, 3), np.float32))
    with torch.no_grad():
        expected = rescale(raw_policy.deterministic(agent.normalizer(torch.from_numpy(obs))))
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    assert [p.name for p in tmp_path.iterdir()] == ["policy.onnx"]  # no temporary file left


def test_non_finite_policy_is_refused_and_the_old_file_kept(tmp_path, spec):
    path = tmp_path / "policy.onnx"
    path.write_bytes(b"previous policy")
    agent = make_agent(spec, seed=2)
    with torch.no_grad():
        agent.policy.net.weights[0][0, 0] = float("nan")
    with pytest.raises(OnnxExportError, match="non-finite"):
        export_policy(agent, spec, path, exporter="torchscript")
    assert path.read_bytes() == b"previous policy"
    assert [p.name for p in tmp_path.iterdir()] == ["policy.onnx"]


class ExportSkewedPolicy(TanhGaussianPolicy):
    """A policy whose exported graph really differs from its eager forward: while an ONNX export
    traces it, it adds ``delta`` to the squashed action (so ``delta * (high - low) / 2`` in env units)."""

    delta = 0.0

    def action_from_noise(self, obs, noise):
        action, log_prob = super().action_from_noise(obs, noise)
        if torch.onnx.is_in_onnx_export():
            action = action + self.delta
        return action, log_prob


def make_skewed_agent(spec, delta: float):
    agent = make_agent(spec, seed=3)
    agent.policy.__class__ = type("Skewed", (ExportSkewedPolicy,), {"delta": delta})
    return agent


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_whose_onnx_output_differs_from_torch_is_refused(tmp_path, spec, exporter):
    """The parity check fails for real: onnxruntime's actions differ from torch's by 1e-4 of the action's half range
    (up to 2e-4 env units) > 1e-5."""
    path = tmp_path / "policy.onnx"
    path.write_bytes(b"previous policy")
    delta = 1e-4  # in units of each action's half range (env units: delta * (high - low) / 2, up to 2e-4)
    with pytest.raises(OnnxExportError, match="differs from torch by") as info:
        export_policy(make_skewed_agent(spec, delta), spec, path, exporter=exporter)
    reported = float(str(info.value).split("differs from torch by ")[1].split()[0])
    assert reported == pytest.approx(delta, abs=2e-5)
    assert path.read_bytes() == b"previous policy"
    assert [p.name for p in tmp_path.iterdir()] == ["policy.onnx"]  # the checked temporary file is gone


def test_parity_tolerance_is_the_threshold_and_the_reported_error_is_measured(tmp_path, spec, monkeypatch):
    """The same skewed export passes under a looser tolerance, reporting the difference it measured,
    which an independent onnxruntime run of the written file confirms."""
    assert PARITY_TOLERANCE == TOL
    monkeypatch.setattr(export_onnx, "PARITY_TOLERANCE", 1e-3)
    agent = make_skewed_agent(spec, 1e-4)
    path, error = export_policy_verified(agent, spec, tmp_path / "policy.onnx", exporter="torchscript")
    assert error == pytest.approx(1e-4, abs=2e-5)  # per half range
    obs = sample_obs(agent, 16, seed=16)
    noise = np.random.default_rng(16).standard_normal((16, ACTION_DIM)).astype(np.float32)
    with torch.no_grad():
        squashed, _ = agent.policy.action_from_noise(agent.normalizer(torch.from_numpy(obs)), torch.from_numpy(noise))
    got = run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), obs, noise)
    np.testing.assert_allclose(got - rescale(squashed), np.broadcast_to((HIGH - LOW) / 2 * 1e-4, got.shape), atol=2e-5)


def test_spec_that_does_not_match_the_agent_is_refused(tmp_path, spec, agent):
    wrong = AgentSpec(**{**spec.__dict__, "obs_dim": OBS_DIM + 1})
    with pytest.raises(ValueError, match="spec"):
        export_policy(agent, wrong, tmp_path / "policy.onnx")
    inverted = AgentSpec(**{**spec.__dict__, "action_low": HIGH.tolist(), "action_high": LOW.tolist()})
    with pytest.raises(ValueError, match="low < high"):
        export_policy(agent, inverted, tmp_path / "policy.onnx")
    assert not (tmp_path / "policy.onnx").exists()


def test_cli_exports_a_saved_checkpoint(tmp_path, spec, agent, capsys):
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoint.pt", agent, spec, step=321)

    assert main([str(run_dir), "--exporter", "torchscript"]) == 0
    out = capsys.readouterr().out
    path = run_dir / "policy.onnx"
    assert str(path) in out and "max |onnxruntime - torch|" in out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["training_step"] == "321"
    obs = sample_obs(agent, 37, seed=37)
    with torch.no_grad():
        expected = rescale(agent.policy.deterministic(agent.normalizer(torch.from_numpy(obs))))
    np.testing.assert_allclose(run(session, obs, np.zeros((37, 3), np.float32)), expected, rtol=0, atol=TOL)

    custom = tmp_path / "elsewhere" / "pi.onnx"
    assert main([str(run_dir / "checkpoint.pt"), "--out", str(custom), "--policy-version", "9"]) == 0
    meta = ort.InferenceSession(str(custom), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["policy_version"] == "9" and str(custom) in capsys.readouterr().out


def test_cli_missing_checkpoint_is_a_clear_error_without_traceback(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and str(missing) in err

    proc = subprocess.run(
        [sys.executable, "-m", "o2o.learner.export_onnx", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"this is not a checkpoint")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and str(bad) in err
    assert not (tmp_path / "policy.onnx").exists()
