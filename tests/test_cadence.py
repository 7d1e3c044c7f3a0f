"""The one cadence both training loops log, evaluate, publish and checkpoint by (learner/cadence.py)."""

from o2o.learner.cadence import Cadence


def due_at(cadence: Cadence, counts) -> list[int]:
    return [c for c in counts if cadence.due(c)]


def test_update_counts_are_due_at_multiples_also_after_a_resume():
    assert due_at(Cadence(25), range(1, 101)) == [25, 50, 75, 100]
    assert due_at(Cadence(25, start=60), range(61, 101)) == [75, 100]  # resumed at 60: the same rhythm
    assert due_at(Cadence(25, start=50), range(51, 76)) == [75]  # not again at the count it resumed at
    assert due_at(Cadence(0), range(1, 101)) == []  # 0: never


def test_the_last_count_is_due_whatever_the_period():
    assert due_at(Cadence(30, last=70), range(1, 71)) == [30, 60, 70]
    assert due_at(Cadence(0, last=70), range(1, 71)) == [70]  # eval.every=0: only at the end


def test_jumping_counts_are_due_a_period_after_the_last_time():
    """Committed rows jump by whole chunks: the next evaluation is a period after the one that ran."""
    evals = Cadence(1000, start=40, aligned=False)
    assert due_at(evals, [500, 1039, 1040, 1700, 2039, 2200, 2600, 3300]) == [1040, 2200, 3300]


def test_left_trims_an_update_burst_to_the_next_log():
    logs = Cadence(200, start=390)
    assert logs.left(390) == 10 and not logs.due(399) and logs.due(400) and logs.left(400) == 200
