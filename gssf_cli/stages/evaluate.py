"""Stage ``evaluate``: retrieval metrics of embeddings or a trained run, tracked as an MLflow run with plots.

The work is :mod:`gssf_cli.evaluation.evaluate`'s (``--embeddings FILE --head RUN``: the file scored by a trained run's
metric head, with a head-only run's adapters); this wrapper logs the config, the metrics (on the evaluation run, and
as ``{split}_{metric}`` on the train run they describe), ``evaluation.json`` and the figures, adds the train run
to what the result says of the model (its id, name and best epoch, counted from 1), and with ``output`` writes
the results file (:func:`gssf_cli.evaluation.evaluate.results_document`) before the run closes. A bad ``output`` is
refused before anything runs: no run, no file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gssf_cli.core.config import to_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import EvaluateConfig
from gssf_cli.evaluation import evaluate as evaluation
from gssf_cli.evaluation.evaluate import EvaluateResult, load_embeddings

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import StageRun, Tracker

__all__ = ["EvaluateResult", "load_embeddings", "run"]


def run(config: EvaluateConfig, tracker: Tracker | None = None, parent_run_id: str | None = None) -> EvaluateResult:
    """Evaluate embeddings or a trained run; metrics, config and plots go to an ``evaluate`` run."""
    config.check_output()
    if config.run is not None:
        if tracker is None:
            raise UserInputError("--run needs a tracking store to find the run")
        return _run_trained(config, tracker, parent_run_id)
    assert config.embeddings is not None
    if config.head is not None:
        if tracker is None:
            raise UserInputError("--head needs a tracking store to find the run")
        return _run_head(config, tracker, parent_run_id)
    outcome = evaluation.evaluate_file(config)  # the file is checked before the store is opened (or created)
    if tracker is None:
        return _write_output(config, outcome.result)
    with tracker.start_run(
        "evaluate", run_name=f"evaluate-{config.embeddings.stem}", parent_run_id=parent_run_id
    ) as run_:
        _log(run_, config, outcome)
        return _write_output(config, replace(outcome.result, run_id=run_.run_id))


def _run_head(config: EvaluateConfig, tracker: Tracker, parent_run_id: str | None) -> EvaluateResult:
    """Score an embeddings file with a trained run's metric head (and a head-only run's adapters). Everything —
    the run, the file, the sizes — is checked before the evaluate run opens."""
    from gssf_cli.stages.runs import load_trained

    assert config.head is not None and config.embeddings is not None
    train_run, model, _ = load_trained(tracker, config.head)
    if model.interaction is not None:
        raise UserInputError(
            f"--head scores embeddings with a run's metric head, and run {train_run.info.run_name} scores token sets "
            f"(--interaction {model.interaction.kind}): evaluate it with --run"
        )
    outcome = _trained_by(tracker, train_run, evaluation.evaluate_file(config, model))
    label = model.label()
    with tracker.start_run(
        "evaluate",
        run_name=f"evaluate-{config.embeddings.stem}-{label}",
        parent_run_id=parent_run_id,
        tags={"gssf.source_run": train_run.info.run_id},
    ) as run_:
        _log(run_, config, outcome)
        return _write_output(config, replace(outcome.result, run_id=run_.run_id))


def _trained_by(tracker: Tracker, train_run: Any, outcome: evaluation.Evaluation) -> evaluation.Evaluation:
    """``outcome`` whose model says which train run it came from (id, name, best epoch counted from 1)."""
    trained_by = {
        "source": "train_run",
        "train_run_id": train_run.info.run_id,
        "train_run_name": train_run.info.run_name,
        "best_epoch": _best_epoch(tracker, train_run),
    }
    return replace(outcome, result=replace(outcome.result, model_info={**trained_by, **outcome.result.model_info}))


def _run_trained(config: EvaluateConfig, tracker: Tracker, parent_run_id: str | None) -> EvaluateResult:
    """Embed the run's test split with its best checkpoint and score with its own metric head."""
    from gssf_cli.stages.runs import load_trained

    train_run, model, dataset = load_trained(tracker, config.run or "latest", config.data)
    if config.shortlist is not None and model.interaction is None:
        raise UserInputError(
            f"--shortlist re-scores with an interaction, and run {train_run.info.run_name} scores pooled embeddings "
            "(--interaction none), exactly already: drop --shortlist"
        )
    outcome = _trained_by(tracker, train_run, evaluation.evaluate_trained(model, dataset, config))
    split_name = config.split or "test"
    with tracker.start_run(
        "evaluate",
        run_name=f"evaluate-{model.label()}-{split_name}",
        parent_run_id=parent_run_id,
        tags={"gssf.source_run": train_run.info.run_id},
    ) as run_:
        run_.log_dataset(dataset.name, dataset.folder, dataset.digest, context=split_name)
        _log(run_, config, outcome)
        metrics = outcome.result.metrics
        tracker.run_handle(train_run.info.run_id).log_metrics({f"{split_name}_{k}": v for k, v in metrics.items()})
        return _write_output(config, replace(outcome.result, run_id=run_.run_id))


def _best_epoch(tracker: Tracker, train_run: Any) -> int | None:
    """The train run's best epoch, counted from 1 (None when it never finished). Runs logged before epochs were
    counted from 1 have their first epoch at step 0 and a 0-based ``best_epoch``: those are shifted."""
    value = train_run.data.metrics.get("best_epoch")
    if value is None:
        return None
    steps = tracker.metric_steps(train_run.info.run_id, "loss")
    return int(value) + (1 if steps and steps[0] == 0 else 0)


def _write_output(config: EvaluateConfig, result: EvaluateResult) -> EvaluateResult:
    """With ``config.output``: write the results file (atomically) and say where in the result."""
    if config.output is None:
        return result
    evaluation.write_results(config.output, evaluation.results_document(result))
    return replace(result, output=str(config.output))


def _log(run_: StageRun, config: EvaluateConfig, outcome: evaluation.Evaluation) -> None:
    result = outcome.result
    run_.log_config("evaluate", to_dict(config))
    run_.log_metrics({**result.metrics, "seconds": result.seconds})
    for index, fold in enumerate(result.folds if len(result.folds) > 1 else []):
        run_.log_metrics({f"fold_{key}": value for key, value in fold.items()}, step=index)
    run_.log_dict(result.to_json(), "evaluation.json")
    if config.plots:
        from gssf_cli.evaluation import plots
        from gssf_cli.evaluation.figures import figures

        for artifact, figure in figures(outcome, config.memory_budget_mb).items():
            run_.log_figure(figure, artifact)
            plots.close(figure)
