"""`o2o-classifier`: train a success classifier and score one before it is used.

    o2o-classifier train task=TASK (store=PATH | dataset=ID_OR_PATH) [out=classifier.onnx] [steps=2000]
                         [batch_size=256] [lr=3e-4] [heldout=0.2] [seed=0] [threshold=0.5]
                         [target_precision=0] [device=auto] [threads=0] [exporter=dynamo]
    o2o-classifier check CLASSIFIER.onnx (store=PATH | dataset=ID_OR_PATH) [task=TASK] [threshold=T]

``train`` labels each observation a step led to with that step's success flag (learner/classifier_data.py),
trains on 80 % of the episodes, prints precision and recall on the other 20 % and writes the ONNX file
(the held-out score in its metadata). ``check`` scores an existing file: on the episodes it held out
when the data are the ones it was trained from, on every episode otherwise (e.g. a newer store).
Settings are ``key=value`` words, as the other o2o commands take them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from o2o.datasets.classifier_format import CLASSIFIER_FILENAME, ClassifierMismatch, HeldOutScore, OnnxClassifier
from o2o.datasets.minari_io import DatasetError
from o2o.datasets.store_format import StoreError
from o2o.envs import get_task

from .classifier_data import LabelError, LabelledObservations, from_dataset, from_store

PROG = "o2o-classifier"


class UsageError(ValueError):
    """A command line that cannot be run as written."""


def _settings_types() -> dict[str, type]:
    from .success_classifier import ClassifierSettings

    kinds = {"int": int, "float": float, "str": str}
    return {f.name: kinds[str(f.type)] for f in dataclasses.fields(ClassifierSettings) if str(f.type) in kinds}


def parse_pairs(words: list[str], types: dict[str, type]) -> dict:
    """``key=value`` words -> {key: value of its type}; an unknown key or a bad value raises ``UsageError``."""
    values = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or key not in types:
            raise UsageError(f"{word!r}: expected key=value with key one of {', '.join(sorted(types))}")
        try:
            values[key] = types[key](text)
        except ValueError:
            raise UsageError(f"{key}={text!r}: not a valid {types[key].__name__}") from None
    return values


def load_data(values: dict, task: str) -> LabelledObservations:
    """The labelled observations of ``store=`` or ``dataset=`` (exactly one)."""
    if ("store" in values) == ("dataset" in values):
        raise UsageError("give exactly one of store=PATH (a replay store) or dataset=ID_OR_PATH (a Minari dataset)")
    if "store" in values:
        return from_store(values["store"], task)
    return from_dataset(values["dataset"], get_task(task))


def cmd_train(words: list[str]) -> int:
    from .setup import init_torch
    from .success_classifier import ClassifierSettings, describe, export_classifier, train_classifier

    settings_types = _settings_types()
    values = parse_pairs(words, {"task": str, "store": str, "dataset": str, "out": str, "threads": int,
                                 "exporter": str, **settings_types})  # fmt: skip
    if "task" not in values:
        raise UsageError("task=TASK is required (the task the robot runs, as the learner names it)")
    settings = ClassifierSettings(**{k: v for k, v in values.items() if k in settings_types})
    init_torch(settings.seed, values.get("threads", 0))
    data = load_data(values, values["task"])
    print(f"{data.source}: {len(data)} observations, {int(data.label.sum())} labelled successes, "
          f"{data.episodes} episodes")
    trained = train_classifier(data, settings, progress=True)
    out = values.get("out", CLASSIFIER_FILENAME)
    error = export_classifier(trained, out, values.get("exporter", "dynamo"))
    print(describe(trained))
    print(f"wrote {out} (threshold {trained.score.threshold:.6g}; max |onnxruntime - torch| = {error:.2g})")
    return 0


def cmd_check(words: list[str]) -> int:
    if not words or "=" in words[0]:
        raise UsageError("usage: o2o-classifier check CLASSIFIER.onnx (store=PATH | dataset=ID) [task=] [threshold=]")
    classifier = OnnxClassifier(words[0])
    values = parse_pairs(words[1:], {"task": str, "store": str, "dataset": str, "threshold": float})
    data = load_data(values, values.get("task", classifier.task))
    classifier.check_fits(data.spec, data.task)
    print(f"{words[0]}: recorded when trained: {classifier.describe()}")
    if data.source == classifier.trained_from:  # what it never trained on: held out, or stored since
        unseen = np.isin(data.episode, classifier.heldout_episode_keys) | (np.arange(len(data)) >= classifier.trained_rows)
        data = data.take(unseen)
        scope = "the episodes it held out (and rows stored since it was trained)"
    else:
        scope = "every episode (not the data it was trained from)"
    if not len(data):
        raise LabelError(f"none of the episodes it held out are in {data.source}")
    threshold = values.get("threshold", classifier.threshold)
    prob = classifier.probabilities(data.state, data.images)
    score = HeldOutScore.of(prob, data.label, threshold, data.episodes)
    print(f"on {scope} of {data.source}: {score.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "check"])
    parser.add_argument("words", nargs="*", help="key=value settings (check: the classifier file first)")
    args = parser.parse_args(argv)
    try:
        return cmd_train(args.words) if args.command == "train" else cmd_check(args.words)
    except (UsageError, LabelError, DatasetError, StoreError, ClassifierMismatch, KeyError, ValueError) as err:
        print(f"{PROG}: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
