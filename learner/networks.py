"""Networks of the Cal-QL agent: tanh-Gaussian policy and a stacked critic ensemble.

Layouts follow the official Cal-QL code (JaxCQL/model.py): hidden layers with
orthogonal(sqrt 2) init and zero bias, last layer orthogonal(1e-2) (or
fan-in uniform scaled by 1e-2 without orthogonal init); the policy's log-std is
``multiplier * raw + offset`` with both scalars trainable, clipped to [-20, 2].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor, last: bool, orthogonal: bool) -> None:
    """Init one layer's weight laid out (in, out), the way JAX/Flax Dense does."""
    fan_in = weight.shape[-2]
    with torch.no_grad():
        if orthogonal:
            gain = 1e-2 if last else math.sqrt(2.0)
            # torch's orthogonal_ works on (out, in); init the transpose for each ensemble member.
            for w in weight.reshape(-1, *weight.shape[-2:]):
                w.copy_(nn.init.orthogonal_(torch.empty(w.shape[1], w.shape[0]), gain).T)
        elif last:
            bound = math.sqrt(3.0 * 1e-2 / fan_in)  # variance_scaling(1e-2, fan_in, uniform)
            weight.uniform_(-bound, bound)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            weight.uniform_(-bound, bound)
        bias.zero_()


class MLP(nn.Module):
    """ReLU MLP with weights stored (in, out)."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, orthogonal_init: bool = True):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            w, b = torch.empty(d_in, d_out), torch.empty(d_out)
            _init_linear_(w, b, last=i == len(dims) - 2, orthogonal=orthogonal_init)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.addmm(b, x, w)
            if i < last:
                x = F.relu(x)
        return x


class TanhGaussianPolicy(nn.Module):
    """pi(a|s) = tanh(N(mean(s), std(s))), actions in [-1, 1]^A."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: list[int],
        orthogonal_init: bool = True,
        log_std_multiplier: float = 1.0,
        log_std_offset: float = -1.0,
    ):
        super().__init__()
        self.action_dim = action_dim
        self.net = MLP(obs_dim, hidden, 2 * action_dim, orthogonal_init)
        self.log_std_multiplier = nn.Parameter(torch.tensor(float(log_std_multiplier)))
        self.log_std_offset = nn.Parameter(torch.tensor(float(log_std_offset)))

    def mean_and_log_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_log_std = self.net(obs).chunk(2, dim=-1)
        log_std = self.log_std_multiplier * raw_log_std + self.log_std_offset
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def action_from_noise(
        self, obs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Action and log-prob for a given standard-normal ``noise`` (zeros: deterministic)."""
        mean, log_std = self.mean_and_log_std(obs)
        pre_tanh = mean + log_std.exp() * noise
        action = torch.tanh(pre_tanh)
        return action, _tanh_gaussian_log_prob(noise, log_std, pre_tanh)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sampled action and its log-prob."""
        return sample_tanh_gaussian(*self.mean_and_log_std(obs))

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.mean_and_log_std(obs)
        action = action.clamp(-1 + 1e-6, 1 - 1e-6)
        pre_tanh = torch.atanh(action)
        noise = (pre_tanh - mean) * torch.exp(-log_std)
        return _tanh_gaussian_log_prob(noise, log_std, pre_tanh)

    @torch.no_grad()
    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mean_and_log_std(obs)[0])


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def sample_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor, n: int | None = None):
    """Actions and log-probs from given (B, A) Gaussian parameters.

    With ``n``, draws n actions per row and returns (B * n, A) / (B * n,) in the
    order of ``x.repeat_interleave(n, 0)``: the MLP runs once per state, not per sample.
    """
    if n is not None:
        mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
        noise = torch.randn(mean.shape[0], n, mean.shape[-1], device=mean.device, dtype=mean.dtype)
    else:
        noise = torch.randn_like(mean)
    pre_tanh = mean + log_std.exp() * noise
    action, log_prob = torch.tanh(pre_tanh), _tanh_gaussian_log_prob(noise, log_std, pre_tanh)
    if n is not None:
        action, log_prob = action.reshape(-1, action.shape[-1]), log_prob.reshape(-1)
    return action, log_prob


def _tanh_gaussian_log_prob(noise: torch.Tensor, log_std: torch.Tensor, pre_tanh: torch.Tensor) -> torch.Tensor:
    gaussian = -0.5 * noise.square() - log_std - _HALF_LOG_2PI
    # log|d tanh(u)/du| = 2 (log 2 - u - softplus(-2u)), the numerically stable form.
    log_det = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (gaussian - log_det).sum(-1)


class CriticEnsemble(nn.Module):
    """E independent Q(s, a) MLPs as stacked (E, in, out) weights, run in one batched call."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: list[int], num_critics: int = 2, orthogonal_init: bool = True,
        feature_norm: bool = False,
    ):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden, 1]
        self.num_critics = num_critics
        self.feature_norm = feature_norm
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            w, b = torch.empty(num_critics, d_in, d_out), torch.empty(num_critics, 1, d_out)
            _init_linear_(w, b, last=i == len(dims) - 2, orthogonal=orthogonal_init)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, obs: torch.Tensor, action: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Q-values of shape (E, N) for N (obs, action) rows.

        ``detach_params`` lets gradients reach the inputs only (the policy loss).
        """
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)
        weights, biases = list(self.weights), list(self.biases)
        if detach_params:
            weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
        for w, b in zip(weights[:-1], biases[:-1]):
            x = F.relu(torch.baddbmm(b, x, w))
        return _ensemble_head(self._features(x), weights[-1], biases[-1])

    def forward_per_state(self, obs: torch.Tensor, actions: torch.Tensor, chunk_rows: int = 0) -> torch.Tensor:
        """Q-values (E, B, K) of K actions (B, K, A) at each of B states (B, obs_dim).

        ``chunk_rows`` > 0 runs chunks of about that many (state, action) rows: on a CPU
        each layer's activations then stay in cache between the GEMM and the elementwise
        ops that follow it (-12% time per update here); one call streams them through DRAM.
        """
        B, K = actions.shape[:2]
        step = max(1, chunk_rows // K) if chunk_rows else B
        if step >= B:
            return self._forward_per_state(obs, actions)
        chunks = [self._forward_per_state(o, a) for o, a in zip(obs.split(step), actions.split(step))]
        return torch.cat(chunks, dim=1)

    def _forward_per_state(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        # The first layer's observation part runs once per state and is broadcast over the K actions.
        E, (B, K, A) = self.num_critics, actions.shape
        w0, b0 = self.weights[0], self.biases[0]
        obs_dim = w0.shape[1] - A
        h_obs = torch.baddbmm(b0, obs.expand(E, -1, -1), w0[:, :obs_dim])  # (E, B, H)
        h_act = torch.matmul(actions.reshape(B * K, A), w0[:, obs_dim:])  # (E, B*K, H)
        x = F.relu(h_act.view(E, B, K, -1) + h_obs.unsqueeze(2)).view(E, B * K, -1)
        for w, b in zip(self.weights[1:-1], self.biases[1:-1]):
            x = F.relu(torch.baddbmm(b, x, w))
        return _ensemble_head(self._features(x), self.weights[-1], self.biases[-1]).view(E, B, K)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features, L2-normalised with ``feature_norm`` (OOO's retraining option:
        x / max(||x||_2, 1e-8) over the feature dimension)."""
        if not self.feature_norm:
            return x
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _ensemble_head(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Last layer (E, N, H) @ (E, H, 1) + b -> (E, N), one matrix-vector product per member.

    On a CPU, bmm with a single output column is ~5x slower than addmv, forward and
    backward (MKL takes a GEMM path for an N x 1 result).
    """
    return torch.stack([torch.addmv(b_i[0], x_i, w_i[:, 0]) for x_i, w_i, b_i in zip(x.unbind(), w.unbind(), b.unbind())])


class ObservationNormalizer(nn.Module):
    """(obs - mean) / std with statistics fixed from the offline data; travels with the weights."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    def set_statistics(self, mean, std, min_std: float = 1e-3) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(min_std))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std
