"""Names of the tracking model that stages write and run lookup reads (standard library only, so a stage module can
name them without importing mlflow)."""

from __future__ import annotations

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own link from a nested run to its parent (the UI folds children into their parent's row)."""
FINAL_RUN_TAG = "gssf.final_run"
"""On a pipeline run: its final train run (the retrained best config when the tune retrains)."""
STEP_KEY_TAG = "gssf.pipeline.step_key"
"""On a run a pipeline step made: the step's cache key (its config and the content of its inputs). A cached step
is trusted only when the run its entry names carries the key the step has now."""
PIPELINE_STAGE = "run"
"""The stage of ``gssf run``'s parent run; its children are the stages' runs."""
SEEDS_STAGE = "seeds"
"""The stage of a ``gssf train --seeds`` run; its children are the ``train`` runs, one per seed (``gssf compare``
takes such a run as the group of its children)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML = "custom_model_development"
"""gssf's experiments are classic ML (``EXPERIMENT_KIND_TAG``), as MLflow 3 marks them. MLflow 3.17's UI ignores
the tag while its "GenAI / Model training" switch is on (as it ships): it opens an experiment in the mode named by
the URL (``?workflowType=machine_learning``) or else the one last picked in that browser (``MLFLOW_VIEW_KEY``),
GenAI when never picked. ``mlflow ui --app-name gssf`` (:mod:`gssf_cli.tracking.ui_app`) serves the UI with "Model
training" as that browser's default."""
MLFLOW_VIEW_KEY = "mlflow.workflowType_v1"
"""The browser's ``localStorage`` key where MLflow 3.17's UI keeps the view picked with its switch."""
MODEL_TRAINING_VIEW = "machine_learning"
"""The value of ``MLFLOW_VIEW_KEY`` (and of the URL's ``workflowType``) for the "Model training" view."""
CHAMPION_ALIAS = "champion"
"""The registry alias of the newest exported version that passed its parity gate: ``models:/NAME@champion``
stays the name of the bundle to serve while versions are added."""
