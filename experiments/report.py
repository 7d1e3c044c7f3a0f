"""`o2o-report RUN_ROOT`: docs/RESULTS.md and its plots from an `o2o-experiment` matrix.

    o2o-report runs/experiment                      # writes docs/RESULTS.md and docs/results_<task>.png
    o2o-report runs/experiment --out /tmp/report    # elsewhere

Reads each cell's folder (<root>/runs/<task>/<method>/seed<k>: cell.json, metrics.jsonl, retrain/*):
- evaluation (deterministic episodes of the current policy, ``eval/...`` with ``eval/online_steps``)
  is kept apart from exploration (the actors' training episodes, ``online/...``);
- offline score = the first evaluation (before any online update; for methods from scratch, the
  untrained agent), final score = the last;
- early dip = the lowest evaluation within the first 10% of online steps (at least the first
  evaluation after the start) minus the offline score;
- training regret = sum over the exploring policy's training episodes of (1 - success);
- OOO: the last retrain's evaluation against the exploring policy's at the same data: its last
  evaluation made by the update at which the retrain took the store (the final one for a retrain
  at the end);
- the deployed policy of a subroutine mode: recommend, the last retrain that passed validation;
  fine_tune, the agent the run ends with (the last accepted retrain when switched in after the last
  evaluation).
Means are over seeds, with the standard deviation; a difference smaller than the spread is said so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from o2o.experiments.cell import CELL_FILE, BudgetConfig, MethodConfig, cell_config
import o2o.learner.metric_keys as keys

MIN_SEEDS = 3  # fewer seeds give numbers, never a verdict
METHOD_ORDER = ["cql", "calql", "calql_sera", "calql_sera_vcse", "calql_rnd_ooo", "cql_rnd_ooo", "sac", "sac_recommend",
                "sac_fine_tune"]  # fmt: skip


@dataclasses.dataclass
class Cell:
    task: str
    method: str
    seed: int
    meta: dict
    eval_steps: np.ndarray  # online env steps of each evaluation
    eval_updates: np.ndarray  # online updates made before each evaluation
    eval_scores: np.ndarray  # normalised scores
    eval_episodes: int
    train_success: np.ndarray  # success of each exploring (training) episode, in order
    retrain_scores: list[float]  # each finished retrain's evaluation, in order
    retrain_started: list[float]  # the online update at which each took the store (nan: not logged)
    retrain_logged: list[int]  # the online update at which each finished (was logged)
    retrain_accepted: list[bool]  # whether each passed validation and was used (runs before validation: all)

    @property
    def offline(self) -> float:
        return float(self.eval_scores[0])

    @property
    def final(self) -> float:
        return float(self.eval_scores[-1])

    @property
    def early_dip(self) -> float:
        """Lowest score in the first 10% of online steps, counting only evaluations made after
        training began (at least the first of them), minus the offline score."""
        trained = self.eval_updates > 0
        if not trained.any():
            return math.nan
        horizon = max(0.1 * self.eval_steps[-1], self.eval_steps[trained][0])
        early = self.eval_scores[trained & (self.eval_steps <= horizon)]
        return float(early.min() - self.offline)

    @property
    def exploring_at_retrain(self) -> float:
        """The exploring policy's score at the last retrain's data: its last evaluation made by the
        update at which the retrain took the store (the final evaluation when that is not logged)."""
        started = self.retrain_started[-1]
        if math.isnan(started):
            return self.final
        made = self.eval_updates <= started
        return float(self.eval_scores[made][-1]) if made.any() else self.offline

    @property
    def method_config(self) -> MethodConfig:
        return cell_config(self.meta).method

    @property
    def budget_config(self) -> BudgetConfig:
        return cell_config(self.meta).budget

    @property
    def retrain_mode(self) -> str | None:
        return self.method_config.retrain_mode

    @property
    def deployed(self) -> float:
        """The score of the policy the run hands over: recommend, the last accepted retrain's; fine_tune,
        the agent it ends with (the last accepted retrain when switched in after the last evaluation);
        else (or when no retrain passed validation) the final evaluation."""
        used = [(score, logged) for score, logged, ok in
                zip(self.retrain_scores, self.retrain_logged, self.retrain_accepted) if ok]  # fmt: skip
        if used and (self.retrain_mode == "recommend" or (
                self.retrain_mode == "fine_tune" and used[-1][1] >= self.eval_updates[-1])):
            return used[-1][0]
        return self.final

    @property
    def regret(self) -> float:
        return float((1.0 - self.train_success).sum())


def load_cell(folder: Path) -> Cell | None:
    """A finished cell (None when it has no cell.json or no evaluation)."""
    if not (folder / CELL_FILE).exists():
        return None
    meta = json.loads((folder / CELL_FILE).read_text())
    evals, train, retrains = [], [], []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keys.EVAL_ONLINE_STEPS in row:
            evals.append((row[keys.EVAL_ONLINE_STEPS], row[keys.EVAL_NORMALIZED_SCORE], row.get(keys.EVAL_EPISODES, 0),
                          row[keys.STEP]))  # fmt: skip
        elif keys.ONLINE_SUCCESS in row:
            train.append(row[keys.ONLINE_SUCCESS])
        elif keys.RETRAIN_NORMALIZED_SCORE in row:
            retrains.append((row[keys.RETRAIN_NORMALIZED_SCORE], row.get(keys.RETRAIN_STARTED_AT_UPDATES, math.nan),
                             row[keys.STEP], bool(row.get(keys.RETRAIN_ACCEPTED, 1))))  # fmt: skip
    if not evals:
        return None
    steps, scores, episodes, updates = map(np.asarray, zip(*evals))
    retrain_columns = [list(x) for x in zip(*retrains)] if retrains else [[], [], [], []]
    return Cell(meta["task"], meta["method"], meta["seed"], meta, steps, updates, scores, int(episodes.max()),
                np.asarray(train, float), *retrain_columns)  # fmt: skip


def load_cells(root: Path) -> list[Cell]:
    cells = [load_cell(folder) for folder in sorted((root / "runs").glob("*/*/seed*")) if folder.is_dir()]
    return [c for c in cells if c is not None]


def mean_std(values) -> tuple[float, float, int]:
    values = np.asarray([v for v in values if not math.isnan(v)], float)
    if len(values) == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std()), len(values)


def fmt(values) -> str:
    mean, std, n = mean_std(values)
    return "-" if n == 0 else f"{mean:.1f} ± {std:.1f}"


def difference(a, b) -> tuple[str, float, int]:
    """(verdict, mean of a - mean of b, seeds of the smaller side): verdict "higher" / "lower" when the
    difference exceeds the larger spread, "within" when not, "few seeds" under MIN_SEEDS, "not measured"."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    seeds, diff = min(na, nb), ma - mb
    if seeds == 0:
        return "not measured", math.nan, 0
    if seeds < MIN_SEEDS:
        return "few seeds", diff, seeds
    if abs(diff) <= max(sa, sb):
        return "within", diff, seeds
    return ("higher" if diff > 0 else "lower"), diff, seeds


def compare(a, b) -> str:
    """'higher' / 'lower' when the mean difference of a - b exceeds the larger spread, else 'within spread'."""
    verdict, diff, seeds = difference(a, b)
    if verdict == "not measured":
        return verdict
    if verdict == "few seeds":
        return f"no verdict: {seeds} seed(s), {MIN_SEEDS} needed ({diff:+.1f})"
    return f"{'within spread' if verdict == 'within' else verdict} ({diff:+.1f})"


def plot_task(task: str, cells: list[Cell], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in ordered(cells):
        runs = [c for c in cells if c.method == method]
        end = min(c.eval_steps[-1] for c in runs)
        grid = np.linspace(0, end, 50)
        curves = np.stack([np.interp(grid, c.eval_steps, c.eval_scores) for c in runs])
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(grid, mean, label=f"{method} ({len(runs)} seeds)")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("online environment steps")
    ax.set_ylabel("normalised score (deterministic eval)")
    ax.set_title(task)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, caption, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ordered(cells: list[Cell]) -> list[str]:
    names = {c.method for c in cells}
    return [m for m in METHOD_ORDER if m in names] + sorted(names - set(METHOD_ORDER))


def by(cells: list[Cell], task: str, method: str) -> list[Cell]:
    return [c for c in cells if c.task == task and c.method == method]


def write_report(root: Path, out_dir: Path) -> Path:
    cells = load_cells(root)
    if not cells:
        raise FileNotFoundError(f"no finished cell (cell.json + evaluations) under {root / 'runs'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = cells[0].meta
    seeds = sorted({c.seed for c in cells})
    budgets = sorted({c.meta["budget"] for c in cells})
    episodes = sorted({c.eval_episodes for c in cells})
    lines = [
        "# Results: does offline-to-online RL deliver here?",
        "",
        f"Generated by `o2o-report {root}` from {len(cells)} finished cells of `o2o-experiment` "
        f"(budget {', '.join(budgets)}, seeds {seeds}, {', '.join(map(str, episodes))} deterministic evaluation "
        f"episodes per point; machine: {meta['machine']}). One cell's command: `{meta['command']}`.",
        f"The cells took {sum(c.meta.get('seconds', 0) for c in cells) / 3600:.1f} h of cell time in all (each "
        "cell's wall time, including a shared pretraining it ran or waited for; cells run in parallel overlap).",
        "Mean ± standard deviation over seeds. Offline = the first evaluation, before any online update "
        "(for methods from scratch: the untrained agent). Evaluation episodes are deterministic and separate "
        "from the exploring policy's training episodes (regret). Early dip < 0: the score fell below the offline "
        "score early on. With fewer than 3 seeds a row gives numbers, never a verdict.",
        "",
    ]
    tasks = sorted({c.task for c in cells})
    for task in tasks:
        task_cells = [c for c in cells if c.task == task]
        figure = out_dir / f"results_{task}.png"
        caption = (f"{task}: {len(seeds)} seeds {seeds}, budget {', '.join(budgets)}, {meta['machine']}; "
                   f"made by: o2o-report {root} (cells: o2o-experiment -m task={task} ...)")  # fmt: skip
        plot_task(task, task_cells, figure, caption)
        lines += [f"## {task}", "", f"![{task}]({figure.name})", "", caption, "",
                  "| method | seeds | offline | after fine-tuning | early dip | training regret (episodes) | "
                  "OOO retrain | exploring policy at the same data |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for method in ordered(task_cells):
            runs = by(cells, task, method)
            retrained = [c for c in runs if c.retrain_scores]
            retrain = fmt([c.retrain_scores[-1] for c in retrained]) if retrained else "-"
            exploring = fmt([c.exploring_at_retrain for c in retrained]) if retrained else "-"
            lines.append(f"| {method} | {len(runs)} | {fmt([c.offline for c in runs])} | {fmt([c.final for c in runs])} | "
                         f"{fmt([c.early_dip for c in runs])} | {fmt([c.regret for c in runs])} | "
                         f"{retrain} | {exploring} |")  # fmt: skip
        lines.append("")
    lines += answers(cells, tasks)
    lines += paper_signs(cells, tasks)
    lines += coverage(cells, tasks)
    path = out_dir / "RESULTS.md"
    kept = kept_sections(path.read_text()) if path.exists() else ""
    path.write_text("\n".join(lines) + "\n" + kept)
    return path


def kept_sections(text: str) -> str:
    """The blocks other experiments write into RESULTS.md (``<!-- name:start -->`` .. ``<!-- name:end -->``,
    e.g. experiments/pixels_vs_state.py's): the matrix's report keeps them, after its own."""
    blocks = re.finditer(r"<!-- (\w+):start -->.*?<!-- \1:end -->", text, re.S)
    return "".join("\n" + block.group(0) + "\n" for block in blocks)


def answers(cells: list[Cell], tasks: list[str]) -> list[str]:
    """The report's questions, answered from the numbers (with their spread)."""
    out = ["## What the numbers say", ""]

    def finals(task, method):
        return [c.final for c in by(cells, task, method)]

    out.append("**Does online fine-tuning improve on the offline policy?** (final minus offline, per task)")
    for task in tasks:
        parts = []
        for method in ordered([c for c in cells if c.task == task]):
            runs = by(cells, task, method)
            parts.append(f"{method} {compare([c.final for c in runs], [c.offline for c in runs])}")
        out.append(f"- {task}: " + "; ".join(parts))
    out += ["", "**Is Cal-QL's early dip smaller than CQL's, and its final score at least CQL's?**"]
    for task in tasks:
        calql, cql = by(cells, task, "calql"), by(cells, task, "cql")
        if calql and cql:
            out.append(f"- {task}: dip Cal-QL {fmt([c.early_dip for c in calql])} vs CQL {fmt([c.early_dip for c in cql])} "
                       f"(Cal-QL {compare([c.early_dip for c in calql], [c.early_dip for c in cql])}); final Cal-QL "
                       f"{fmt(finals(task, 'calql'))} vs CQL {fmt(finals(task, 'cql'))} "
                       f"(Cal-QL {compare(finals(task, 'calql'), finals(task, 'cql'))})")  # fmt: skip
    out += ["", "**Does the OOO retrained policy score at least as well as the exploring policy it was trained from?**"]
    for task in tasks:
        for method in ordered([c for c in cells if c.task == task]):
            runs = [c for c in by(cells, task, method) if c.retrain_scores]
            if runs:
                retrain, exploring = [c.retrain_scores[-1] for c in runs], [c.exploring_at_retrain for c in runs]
                out.append(f"- {task} / {method}: retrain {fmt(retrain)} vs exploring at the same data "
                           f"{fmt(exploring)}: retrain {compare(retrain, exploring)}")  # fmt: skip
    out += ["", "**What does SERA change? What do the subroutine modes give over SAC from scratch?**"]
    for task in tasks:
        for sera, label in (("calql_sera", "SERA centred (o2o's default)"), ("calql_sera_vcse", "SERA as VCSE (uncentred)")):
            if by(cells, task, sera) and by(cells, task, "calql"):
                out.append(f"- {task}: Cal-QL + {label} final {fmt(finals(task, sera))} vs Cal-QL "
                           f"{fmt(finals(task, 'calql'))}: {compare(finals(task, sera), finals(task, 'calql'))}")
        for mode in ("sac_recommend", "sac_fine_tune"):
            runs = by(cells, task, mode)
            if runs and by(cells, task, "sac"):
                deployed = [c.deployed for c in runs]  # the policy the run hands over
                out.append(f"- {task}: {mode} (the policy it hands over) {fmt(deployed)} vs SAC "
                           f"{fmt(finals(task, 'sac'))}: {compare(deployed, finals(task, 'sac'))}")
    out.append("")
    return out


# What a claim compares, per cell list: the score named in the table.
MEASURES = {
    "final score": lambda cells: [c.final for c in cells],
    "retrain": lambda cells: [c.retrain_scores[-1] for c in cells if c.retrain_scores],
    "exploring policy": lambda cells: [c.exploring_at_retrain for c in cells if c.retrain_scores],
    "policy handed over": lambda cells: [c.deployed for c in cells],
}
# Each method's effect as its paper states it: (method, the paper and its claim, the method's measure, its
# baseline method, the baseline's measure). Every claim is an improvement, so the paper's sign is +.
PAPER_CLAIMS = [
    ("calql", "Cal-QL (Nakamoto et al. 2023): fine-tunes faster than CQL from the same offline data",
     "final score", "cql", "final score"),
    ("calql_sera", "SERA (Zhang et al. 2024): its bonus improves the offline-to-online method it is added to",
     "final score", "calql", "final score"),
    ("calql_sera_vcse", "SERA with VCSE's uncentred bonus: as calql_sera", "final score", "calql", "final score"),
    ("calql_rnd_ooo", "OOO (Mark et al. 2023): the retrained (exploitation) policy beats the exploring one at the same data",
     "retrain", "calql_rnd_ooo", "exploring policy"),
    ("cql_rnd_ooo", "OOO as released (CQL + RND explores): as calql_rnd_ooo", "retrain", "cql_rnd_ooo", "exploring policy"),
    ("sac_recommend", "offline RL as a subroutine: the recommended (retrained) policy beats plain SAC",
     "policy handed over", "sac", "final score"),
    ("sac_fine_tune", "offline RL as a subroutine: fine-tuning from each retrained agent beats plain SAC",
     "policy handed over", "sac", "final score"),
]  # fmt: skip


def sign_here(a, b) -> str:
    """Whether a - b shows the papers' + sign: 'matches' beyond the spread, 'opposite' beyond it, 'not shown' within."""
    verdict, _, seeds = difference(a, b)
    if verdict == "few seeds":
        return f"no verdict ({seeds} of {MIN_SEEDS} seeds)"
    return {"not measured": "not measured", "within": "not shown (within spread)", "higher": "matches (+)",
            "lower": "opposite (-)"}[verdict]  # fmt: skip


def paper_signs(cells: list[Cell], tasks: list[str]) -> list[str]:
    """Per method and task: does the sign of its paper's effect show at this budget?"""
    out = ["## Do the papers' effects show here? (sign at this budget)", "",
           "Each paper reports an improvement (+). 'matches': the mean difference is positive and larger than the "
           "larger of the two spreads; 'opposite': negative and larger; 'not shown': within the spread.", "",
           "| task | method | the paper's claim | here | baseline | difference | sign here |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in tasks:
        for method, claim, what, base, base_what in PAPER_CLAIMS:
            runs, baseline = by(cells, task, method), by(cells, task, base)
            if not runs or not baseline:
                continue
            a, b = MEASURES[what](runs), MEASURES[base_what](baseline)
            diff = mean_std(a)[0] - mean_std(b)[0] if a and b else math.nan
            out.append(f"| {task} | {method} | {claim} | {what} {fmt(a)} | {base} {base_what} {fmt(b)} | "
                       f"{diff:+.1f} | {sign_here(a, b)} |")  # fmt: skip
    out.append("")
    return out


def known_methods() -> list[str]:
    from importlib.resources import files

    return sorted(p.name.removesuffix(".yaml") for p in (files("o2o.configs") / "method").iterdir()
                  if p.name.endswith(".yaml"))  # fmt: skip


def coverage(cells: list[Cell], tasks: list[str]) -> list[str]:
    """What the matrix lacks, and what its budget can and cannot show (never tuned per method)."""
    out = ["## What this matrix cannot show", ""]
    for task in tasks:
        short = []
        for method in known_methods():
            n = len(by(cells, task, method))
            if n < MIN_SEEDS:
                short.append(f"{method} ({n} of {MIN_SEEDS} seeds)")
        if short:
            out.append(f"- {task}: not measured or short of seeds: {', '.join(short)}.")
    budgets = sorted({c.meta["budget"] for c in cells})
    if budgets != ["paper"]:
        out.append(
            f"- Budget {', '.join(budgets)} is far below the papers' (Cal-QL / CORL: 1M offline + 1M online updates, "
            "20 evaluation episodes every 5000 steps; OOO and SERA likewise). The effects they report (CORL's AntMaze "
            "Cal-QL 53.0 -> 97.3 vs CQL 48.4 -> 95.6, OOO +14-26%, SERA +9-12%) need that budget: a difference "
            "within spread here is no evidence against them. The budget that would show them is `budget=paper` "
            "(README, 'Experiments and the results report'), on a GPU server or a cluster.")  # fmt: skip
    retrained = [c for c in cells if c.retrain_scores]
    if retrained:
        c = retrained[0]
        budget = c.budget_config
        if budget.retrain_steps:
            out.append(
                f"- A retrain (OOO, the subroutine modes) trains a new agent from scratch for {budget.retrain_steps} "
                f"updates (budget {c.meta['budget']}), while the exploring policy it is compared with had "
                f"{budget.online_updates} online updates after {budget.pretrain_steps} offline ones: OOO retrains for a "
                "full budget, so a retrain scoring below the exploring policy here says little about OOO's claim.")  # fmt: skip
        else:
            out.append(
                "- A retrain trains as many updates as the agent it is compared with had (pretraining plus online "
                "updates so far: retrain_steps=0, as OOO retrains for a full budget), so the comparison with the "
                "exploring policy is fair in updates; the data are the small budget's few thousand online rows.")  # fmt: skip
    out.append("- Every method runs with the same settings of its budget; nothing was tuned on the evaluation seeds.")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="o2o-report", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="the o2o-experiment root (its runs/ folder holds the cells)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where RESULTS.md and the plots go")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.root, args.out)
    except FileNotFoundError as err:
        print(f"o2o-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
