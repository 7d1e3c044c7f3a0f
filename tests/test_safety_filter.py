"""The safety filter between the policy and the arm, and the link watchdog (robot/safety.py).

Hand-computed cases for each stage (NaN hold, rate limit, bounds), a policy that outputs garbage
(NaN, out of bounds, oscillating), then a property test against a slow per-joint reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from o2o.robot.safety import LinkWatchdog, SafetyFilter

NAN, INF = float("nan"), float("inf")


def three(max_step=0.5) -> SafetyFilter:
    return SafetyFilter([-1, -1, -1], [1, 1, 1], max_step, names=["shoulder", "elbow", "wrist"])


def test_a_non_finite_entry_holds_the_joint_at_its_last_sent_value():
    f = three()
    out = f.filter(np.array([NAN, 0.75, -INF]), np.array([0.25, 0.5, -0.25], np.float32))
    np.testing.assert_array_equal(out, [0.25, 0.75, -0.25])
    assert out.dtype == np.float32
    assert f.counts() == {"non_finite": 1, "rate_limited": 0, "clipped": 0}  # one step, two joints: counted once
    f.filter([1e300, 0.0, 0.0], [0.75, 0.0, 0.0])  # huge but finite (float64): limited and clipped, not held
    assert f.counts() == {"non_finite": 1, "rate_limited": 1, "clipped": 1}


def test_out_of_bounds_actions_are_clipped():
    f = three(max_step=None)  # no rate limit: only the bounds act
    np.testing.assert_array_equal(f.filter([2.0, -3.0, 0.5], [0.0, 0.0, 0.0]), [1.0, -1.0, 0.5])
    np.testing.assert_array_equal(f.filter([1.0, -1.0, 0.5], [0.0, 0.0, 0.0]), [1.0, -1.0, 0.5])  # on the bound
    assert f.counts() == {"non_finite": 0, "rate_limited": 0, "clipped": 1}


def test_an_oscillating_policy_moves_the_arm_at_most_max_step_a_step():
    f = SafetyFilter([-1.0], [1.0], 0.25)
    sent, last = [], np.zeros(1, np.float32)
    for t in range(8):  # the policy: +1, -1, +1, ... (full scale, every step)
        last = f.filter(np.array([1.0 if t % 2 == 0 else -1.0]), last)
        sent.append(float(last[0]))
    assert sent == [0.25, 0.0] * 4  # each step moves 0.25 toward the policy's target, then back
    assert max(abs(b - a) for a, b in zip([0.0, *sent], sent)) <= 0.25
    assert f.rate_limited == 8 and f.clipped == 0
    ramp = [float(f.filter([1.0], [x])[0]) for x in (0.0, 0.25, 0.5, 0.75, 1.0)]  # a steady target: a ramp
    assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_a_last_sent_outside_the_bounds_still_gives_an_action_inside_them():
    f = SafetyFilter([-1.0, -1.0], [1.0, 1.0], 0.1)
    # the measured position 0.5 past the limit: the rate window [1.4, 1.6] misses the bounds, which win
    np.testing.assert_array_equal(f.filter([1.5, 0.0], [1.5, 0.0]), [1.0, 0.0])
    # a hair past (1.05): the window [0.95, 1.15] meets the bounds; the result lies in both
    np.testing.assert_allclose(f.filter([0.0, 0.0], [1.05, 0.0]), [0.95, 0.0], rtol=0, atol=1e-7)
    assert f.clipped == 1 and f.rate_limited == 1


def test_per_joint_max_step_and_no_limit_for_one_joint():
    f = SafetyFilter([-2, -2], [2, 2], [0.5, math.inf])
    np.testing.assert_array_equal(f.filter([2.0, 2.0], [0.0, 0.0]), [0.5, 2.0])


def test_the_result_is_a_new_array_and_the_inputs_are_untouched():
    f = three()
    action = np.array([NAN, 5.0, 0.1], np.float32)
    last = np.array([0.0, 0.0, 0.1], np.float32)
    a0, l0 = action.copy(), last.copy()
    out = f.filter(action, last)
    np.testing.assert_array_equal(action, a0)  # NaN compared equal to NaN
    np.testing.assert_array_equal(last, l0)
    calm = np.array([0.0, 0.0, 0.1], np.float32)  # nothing to change: still a copy, not the input itself
    same = three().filter(calm, last)
    for result in (out, same):
        assert not np.shares_memory(result, action) and not np.shares_memory(result, last)
        assert not np.shares_memory(result, calm)
    same[0] = 9.0
    assert calm[0] == 0.0


def test_bad_construction_and_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match=r"joint 1 \(elbow\).*low must be below high"):
        SafetyFilter([0, 1], [1, 1], 0.1, names=["shoulder", "elbow"])
    with pytest.raises(ValueError, match=r"joint 0.*finite"):
        SafetyFilter([NAN, 0], [1, 1], 0.1)
    with pytest.raises(ValueError, match=r"joint 1.*finite"):
        SafetyFilter([0, 0], [1, INF], 0.1)
    with pytest.raises(ValueError, match=r"joint 2 \(wrist\).*max_step must be > 0"):
        three(max_step=[0.1, 0.1, 0.0])
    with pytest.raises(ValueError, match=r"max_step must be > 0"):
        three(max_step=NAN)
    with pytest.raises(ValueError, match=r"max_step must be > 0"):
        three(max_step=-0.1)
    with pytest.raises(ValueError, match=r"one per joint \(3\)"):
        three(max_step=[0.1, 0.1])
    with pytest.raises(ValueError, match=r"1-D of one length"):
        SafetyFilter([0, 0], [1, 1, 1], 0.1)
    with pytest.raises(ValueError, match=r"2 names for 3 joints"):
        SafetyFilter([0, 0, 0], [1, 1, 1], names=["a", "b"])
    f = three()
    with pytest.raises(ValueError, match=r"must have 3 values"):
        f.filter([0.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"must have 3 values"):
        f.filter(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match=r"joint 1 \(elbow\): last_sent is nan"):
        f.filter([0.0, 0.0, 0.0], [0.0, NAN, 0.0])
    assert f.counts() == {"non_finite": 0, "rate_limited": 0, "clipped": 0}


def slow_reference(low, high, step, action, last):
    """Per joint, in the contract's words: hold a non-finite entry, limit the change, clip to the bounds.
    Returns the float32 result and which stages changed something."""
    out, held, limited, clipped = [], False, False, False
    for j in range(len(action)):
        x = float(action[j])
        if math.isnan(x) or math.isinf(x):
            x, held = float(last[j]), True
        y = min(max(x, float(last[j]) - step[j]), float(last[j]) + step[j])
        limited |= y != x
        z = min(max(y, float(low[j])), float(high[j]))
        clipped |= z != y
        out.append(z)
    return np.array(out, np.float32), (held, limited, clipped)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 14))
    joint = st.floats(-3, 3, width=32)
    low = np.array([draw(joint) for _ in range(n)], np.float32)
    high = low + np.array([draw(st.floats(0.015625, 3, width=32)) for _ in range(n)], np.float32)
    kind = draw(st.sampled_from(["scalar", "per joint", "none"]))
    step = {"scalar": lambda: draw(st.floats(1e-3, 2)),
            "per joint": lambda: [draw(st.floats(1e-3, 2) | st.just(INF)) for _ in range(n)],
            "none": lambda: None}[kind]()  # fmt: skip
    # the policy's garbage: in and out of bounds, huge (finite in its dtype), NaN, inf
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    huge = float(np.finfo(dtype).max)
    value = st.floats(-10, 10) | st.sampled_from([NAN, INF, -INF, huge, -huge])
    action = np.array([draw(value) for _ in range(n)], dtype)
    last = np.array([draw(st.floats(-4, 4, width=32)) for _ in range(n)], np.float32)  # at times past the bounds
    return low, high, step, action, last


@settings(max_examples=400, deadline=None)
@given(cases())
def test_matches_a_slow_per_joint_reference_on_random_garbage(case):
    low, high, step, action, last = case
    f = SafetyFilter(low, high, step)
    before = action.copy()
    out = f.filter(action, last)
    steps = np.broadcast_to(np.float64(INF) if step is None else np.asarray(step, np.float64), low.shape)
    expected, (held, limited, clipped) = slow_reference(low, high, steps, action, last)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.all((low <= out) & (out <= high))  # always inside the bounds, whatever last_sent was
    reachable = (last - steps <= high) & (last + steps >= low)  # the rate window meets the bounds there
    moved = np.abs(out.astype(np.float64) - last)
    assert np.all(moved[reachable] <= steps[reachable] + 1e-6 * (1 + np.abs(last[reachable])))  # float32 rounding
    assert f.counts() == {"non_finite": int(held), "rate_limited": int(limited), "clipped": int(clipped)}
    np.testing.assert_array_equal(action, before)


def test_link_watchdog_says_why_the_arm_holds():
    w = LinkWatchdog(learner_gone_s=10, max_policy_lag=5)
    assert w.reason(12.0, 0) == "the learner has been silent for 12.0 s (> 10 s)"
    assert w.reason(None, 6) == "the policy is 6 versions behind the learner (> 5)"
    assert w.reason(12.0, 6) == ("the learner has been silent for 12.0 s (> 10 s); "
                                 "the policy is 6 versions behind the learner (> 5)")  # fmt: skip
    assert w.reason(10.0, 5) is None  # at the limit: not past it
    assert w.reason(None, None) is None  # nothing known yet (no contact, no policy): no hold from here
    assert w.reason(0.5, 0) is None
    off = LinkWatchdog(learner_gone_s=0, max_policy_lag=0)  # 0 switches each check off
    assert off.reason(1e9, 1000) is None
    assert LinkWatchdog(0, 2).reason(1e9, 3) == "the policy is 3 versions behind the learner (> 2)"
    assert LinkWatchdog(2.5, 0).reason(3.0, 1000) == "the learner has been silent for 3.0 s (> 2.5 s)"
    for bad in ((-1, 5), (NAN, 5), (INF, 5), (10, -1), (10, 2.5), (10, True)):
        with pytest.raises(ValueError):
            LinkWatchdog(*bad)
