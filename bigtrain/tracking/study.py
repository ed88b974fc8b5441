"""This run as a trial of an Optuna study (``bigtrain sweep --sweep-mode bayes``, launcher/bayes.py).

The sweep names the study in the trial's environment; rank 0 reports the metric at every
evaluation and asks the study's pruner whether to stop (the run then saves, stops at the step
boundary and exits with ``exit_codes.PRUNED``). Optuna only, no torch."""

from __future__ import annotations

import os
from typing import Any

STUDY_FILE = "study.journal"
ENV_STUDY, ENV_NAME, ENV_TRIAL, ENV_METRIC, ENV_PRUNER = (
    "BIGTRAIN_STUDY", "BIGTRAIN_STUDY_NAME", "BIGTRAIN_TRIAL_ID", "BIGTRAIN_STUDY_METRIC", "BIGTRAIN_PRUNER")


def journal_storage(path: str):
    """Optuna's journal file storage: appends under a file lock, safe for trials on several nodes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def make_pruner(kind: str):
    """median: stop a trial worse than the median of earlier trials at the same step (after 2 trials);
    asha: successive halving; none."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"--pruner: expected median, asha or none (got {kind!r})")


class StudyTrial:
    def __init__(self, path: str, name: str, trial_id: int, metric: str, pruner: str):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=name, storage=journal_storage(path), pruner=make_pruner(pruner))
        self.trial, self.metric = optuna.trial.Trial(study, trial_id), metric

    @classmethod
    def from_env(cls) -> StudyTrial | None:
        env = os.environ
        if not env.get(ENV_STUDY):
            return None
        return cls(env[ENV_STUDY], env[ENV_NAME], int(env[ENV_TRIAL]), env.get(ENV_METRIC, "val_loss"),
                   env.get(ENV_PRUNER, "median"))

    def report(self, evals: dict[str, Any]) -> str | None:
        """Report an evaluation; why the trial should stop now, or None."""
        value = evals.get(self.metric)
        if value is None:
            return None
        self.trial.report(float(value), int(evals["step"]))
        if self.trial.should_prune():
            return f"pruned by the study ({self.metric} {float(value):.4f} at step {evals['step']})"
        return None
