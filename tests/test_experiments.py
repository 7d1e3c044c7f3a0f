"""`o2o-experiment` (one real cell, skipped when rerun) and `o2o-report` (numbers checked by hand)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from o2o.experiments.report import load_cells, write_report


def write_cell(root: Path, task: str, method: str, seed: int, evals: list[tuple[int, float]], successes: list[float],
               retrains: list[float] = ()) -> None:  # fmt: skip
    folder = root / "runs" / task / method / f"seed{seed}"
    folder.mkdir(parents=True)
    rows = [{"step": 10 * i, "eval/online_steps": s, "eval/normalized_score": v, "eval/success": v / 100, "eval/episodes": 10}
            for i, (s, v) in enumerate(evals)]  # fmt: skip
    rows += [{"step": 0, "online/success": x, "online/return": x} for x in successes]
    rows += [{"step": 0, "actor_eval/success": 1.0}]  # actors' eval episodes: never counted as training episodes
    rows += [{"step": 0, "retrain/normalized_score": v} for v in retrains]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cell = {"task": task, "method": method, "seed": seed, "budget": "small", "machine": "test box", "command": "o2o-experiment x"}
    (folder / "cell.json").write_text(json.dumps(cell))


def test_report_numbers_by_hand(tmp_path):
    root = tmp_path / "root"
    # Cal-QL: offline 40, dips to 30 at step 100 (within the first 10% of 2000 steps), ends at 80 / 60.
    write_cell(root, "pointmaze-medium", "calql", 0, [(0, 40), (100, 30), (1000, 70), (2000, 80)], [0, 1, 1, 0])
    write_cell(root, "pointmaze-medium", "calql", 1, [(0, 40), (100, 40), (1000, 50), (2000, 60)], [1, 1, 1, 1])
    write_cell(root, "pointmaze-medium", "calql", 2, [(0, 40), (100, 35), (2000, 70)], [1, 0])
    write_cell(root, "pointmaze-medium", "cql", 0, [(0, 40), (100, 0), (2000, 50)], [0, 0], retrains=[20, 90])
    (root / "runs" / "pointmaze-medium" / "cql" / "seed1").mkdir(parents=True)  # unfinished: no cell.json

    cells = {(c.method, c.seed): c for c in load_cells(root)}
    assert set(cells) == {("calql", 0), ("calql", 1), ("calql", 2), ("cql", 0)}
    assert cells["calql", 0].offline == 40 and cells["calql", 0].final == 80
    assert cells["calql", 0].early_dip == -10 and cells["calql", 1].early_dip == 0
    assert cells["calql", 0].regret == 2 and cells["calql", 1].regret == 0
    assert cells["cql", 0].early_dip == -40 and cells["cql", 0].retrain_scores == [20, 90]

    path = write_report(root, tmp_path / "docs")
    text = path.read_text()
    assert (tmp_path / "docs" / "results_pointmaze-medium.png").stat().st_size > 1000
    # calql: offline 40 ± 0; finals 80, 60, 70; dips -10, 0, -5; regrets 2, 0, 1 (population std).
    assert "| calql | 3 | 40.0 ± 0.0 | 70.0 ± 8.2 | -5.0 ± 4.1 | 1.0 ± 0.8 | - | - |" in text
    assert "| cql | 1 | 40.0 ± 0.0 | 50.0 ± 0.0 | -40.0 ± 0.0 | 2.0 ± 0.0 | 90.0 ± 0.0 | 50.0 ± 0.0 |" in text
    assert "calql higher (+30.0)" in text  # final 70 vs offline 40, beyond the spread of 8.2
    assert "retrain no verdict: 1 seed(s), 3 needed (+40.0)" in text  # one seed: numbers, no verdict
    assert "seeds [0, 1, 2]" in text and "test box" in text
    # What is missing is listed (cql: 1 of 3 seeds; sac: never run), and the small budget is named as such.
    missing = text[text.index("## What this matrix cannot show"):]
    assert "cql (1 of 3 seeds)" in missing and "sac (0 of 3 seeds)" in missing and "calql (" not in missing
    assert "Budget small is far below the papers'" in missing and "`budget=paper`" in missing


def test_retrains_are_compared_at_their_own_data_and_fine_tune_hands_over_its_last_switch(tmp_path):
    root = tmp_path / "root"
    evals = [(0, 0), (1000, 20), (2000, 40), (3000, 60)]  # at updates 0, 10, 20, 30 (write_cell: step = 10 i)
    for seed, mode in enumerate(["fine_tune", "fine_tune", "recommend"]):
        write_cell(root, "pointmaze-medium", f"sac_{mode}", seed, evals, [0], retrains=[5, 90])
        folder = root / "runs" / "pointmaze-medium" / f"sac_{mode}" / f"seed{seed}"
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        # The retrains took the store at updates 10 and 15 and finished at 20 and (seed 1: before the last
        # evaluation) 25 or (else) 30.
        retrains = [r for r in rows if "retrain/normalized_score" in r]
        retrains[0].update({"retrain/started_at_updates": 10, "step": 20})
        retrains[1].update({"retrain/started_at_updates": 15, "step": 25 if seed == 1 else 30})
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        cell = json.loads((folder / "cell.json").read_text())
        cell["config"] = {"method": {"retrain_every": 10, "retrain_mode": mode},
                          "budget": {"pretrain_steps": 300, "online_updates": 30, "retrain_steps": 7}}
        (folder / "cell.json").write_text(json.dumps(cell))
    cells = {c.seed: c for c in load_cells(root)}
    # The exploring policy at the last retrain's data: the last evaluation by update 15, the one at update 10.
    assert [cells[k].exploring_at_retrain for k in range(3)] == [20, 20, 20]
    # fine_tune ends on the retrain switched in at update 30 (seed 0), not on one switched in before the
    # last evaluation (seed 1: the evaluation at 30 is of the agent it ends with); recommend hands over the retrain.
    assert [cells[k].deployed for k in range(3)] == [90, 60, 90]
    assert [cells[k].final for k in range(3)] == [60, 60, 60]
    text = write_report(root, tmp_path / "docs").read_text()
    assert "| sac_fine_tune | 2 | 0.0 ± 0.0 | 60.0 ± 0.0 | 20.0 ± 0.0 | 1.0 ± 0.0 | 90.0 ± 0.0 | 20.0 ± 0.0 |" in text
    # The retrains' handicap at this budget is stated, with the budget's own numbers.
    assert "from scratch for 7 updates (budget small)" in text and "had 30 online updates after 300 offline" in text


def test_the_report_says_per_method_whether_its_papers_sign_shows(tmp_path):
    """Each paper claims a + effect; the sign table compares the method's measure with its baseline's, by hand:
    'matches' beyond the larger spread, 'opposite' beyond it, 'not shown' within, no verdict under 3 seeds."""
    root = tmp_path / "root"
    for seed, (calql, cql, sera) in enumerate([(80, 40, 70), (60, 40, 70), (70, 40, 70)]):
        write_cell(root, "pointmaze-medium", "calql", seed, [(0, 40), (2000, calql)], [1])
        write_cell(root, "pointmaze-medium", "cql", seed, [(0, 40), (2000, cql)], [1])
        write_cell(root, "pointmaze-medium", "calql_sera", seed, [(0, 40), (2000, sera)], [1])
    for seed in range(2):
        write_cell(root, "pointmaze-medium", "sac", seed, [(0, 0), (2000, 50)], [1])
        write_cell(root, "pointmaze-medium", "sac_recommend", seed, [(0, 0), (2000, 10)], [1])
    text = write_report(root, tmp_path / "docs").read_text()
    table = text[text.index("## Do the papers' effects show here?"):text.index("## What this matrix cannot show")]
    # calql finals 80 60 70 (70 ± 8.2) vs cql 40 ± 0: +30, beyond 8.2
    assert "| calql | 40.0 ± 0.0 |" not in table and "cql final score 40.0 ± 0.0 | +30.0 | matches (+) |" in table
    # calql_sera 70 ± 0 vs calql 70 ± 8.2: 0, within the spread
    assert "| calql_sera |" in table and "calql final score 70.0 ± 8.2 | +0.0 | not shown (within spread) |" in table
    # sac_recommend hands over its final policy, 10, vs SAC 50 on 2 seeds: no verdict
    assert "sac final score 50.0 ± 0.0 | -40.0 | no verdict (2 of 3 seeds) |" in table
    # cql beyond calql (opposite sign) on another task
    for seed in range(3):
        write_cell(root, "fetch-push", "calql", seed, [(0, 0), (2000, 10)], [0])
        write_cell(root, "fetch-push", "cql", seed, [(0, 0), (2000, 30)], [0])
    text = write_report(root, tmp_path / "docs").read_text()
    assert "| fetch-push | calql |" in text and "| -20.0 | opposite (-) |" in text


def test_report_without_cells_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "o2o.experiments.report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no finished cell" in done.stderr


NET = "net:{policy_hidden:[16,16],critic_hidden:[16,16]}"
TINY = [
    "budget.pretrain_steps=40", "budget.online_updates=40", "budget.eval_every_steps=0", "budget.eval_episodes=1",
    f"++budget.pretrain={{batch_size:32,{NET},eval:{{every:0,episodes:1}},checkpoint_every:40}}",
    f"++budget.learner={{batch_size:32,warmup_rows:100,{NET},max_updates_ahead:0}}",
    # link.drain_s=0: o2o-launch stops the actor after the learner, when no acks can come.
    "++budget.actor={control_hz:0,eval_every:0,max_episode_steps:50,link:{drain_s:0}}",
    "budget.dataset_quality=mixed",
    "budget.dataset_episodes=6",
]  # fmt: skip


@pytest.mark.parametrize("method", ["calql"])
def test_a_real_cell_runs_once_and_is_skipped_when_run_again(tmp_path, method):
    cmd = [sys.executable, "-m", "o2o.launch.experiment", "task=pointmaze-umaze", f"method={method}", "seed=0",
           f"root={tmp_path}", "threads=1", *TINY]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cell_dir = tmp_path / "runs" / "pointmaze-umaze" / method / "seed0"
    cell = json.loads((cell_dir / "cell.json").read_text())
    assert cell["method"] == method and cell["pretrained"].endswith("pretrain/pointmaze-umaze/calql/seed0/checkpoint.pt")
    evals = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text().splitlines() if "eval/online_steps" in line]
    assert len(evals) >= 2  # the offline policy before the first online update, and the fine-tuned one
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "is done: skipped" in again.stdout
    assert len(load_cells(tmp_path)) == 1


def test_a_recommended_run_hands_over_only_retrains_that_passed_validation(tmp_path):
    root = tmp_path / "root"
    write_cell(root, "pointmaze-medium", "sac_recommend", 0, [(0, 0), (2000, 50)], [0, 1], retrains=[30, 60, 20])
    metrics = root / "runs" / "pointmaze-medium" / "sac_recommend" / "seed0" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    accepted = iter([1, 1, 0])  # the last retrain (20) scored below the recommended one (60): rejected
    rows = [{**r, "retrain/accepted": next(accepted)} if "retrain/normalized_score" in r else r for r in rows]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (cell,) = load_cells(root)
    cell.meta["config"] = {"method": {"retrain_mode": "recommend"}}
    assert cell.retrain_accepted == [True, True, False]
    assert cell.deployed == 60  # the last accepted retrain, not the last one


def test_the_matrix_report_keeps_the_sections_other_experiments_wrote(tmp_path):
    """experiments/pixels_vs_state.py writes its table between markers in RESULTS.md; regenerating the
    matrix's report must not delete it (nor keep stale matrix text)."""
    root = tmp_path / "root"
    write_cell(root, "pointmaze-medium", "calql", 0, [(0, 40), (2000, 60)], [1])
    docs = tmp_path / "docs"
    docs.mkdir()
    block = "<!-- pixels:start -->\n## Offline Cal-QL from pixels vs from state\n| 3000 | 90.0 | 60.0 |\n<!-- pixels:end -->"
    (docs / "RESULTS.md").write_text("# stale matrix text\n\n" + block + "\n")
    text = write_report(root, docs).read_text()
    assert block in text and "stale matrix text" not in text
    assert write_report(root, docs).read_text() == text  # kept once, not appended again on every run
