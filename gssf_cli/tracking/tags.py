"""Names of the tracking model that stages write and run lookup reads (standard library only, so a stage module can
name them without importing mlflow)."""

from __future__ import annotations

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own link from a nested run to its parent (the UI folds children into their parent's row)."""
FINAL_RUN_TAG = "gssf.final_run"
"""On a pipeline run: its final train run (the retrained best config when the tune retrains)."""
PIPELINE_STAGE = "run"
"""The stage of ``gssf run``'s parent run; its children are the stages' runs."""
SEEDS_STAGE = "seeds"
"""The stage of a ``gssf train --seeds`` run; its children are the ``train`` runs, one per seed (``gssf compare``
takes such a run as the group of its children)."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_ML = "custom_model_development"
"""gssf's experiments are classic ML (``EXPERIMENT_KIND_TAG``), as MLflow 3 marks them. The UI picks its view from
this tag only while its "GenAI / Model training" switch is off; MLflow 3.17 ships it on, and then opens an
experiment in the mode named by the URL (``?workflowType=machine_learning``) or else the mode last picked in that
browser (``localStorage["mlflow.workflowType_v1"]``, GenAI when never picked) — nothing in the store or the server
chooses it, so the README tells users to pick "Model training" once."""
CHAMPION_ALIAS = "champion"
"""The registry alias of the newest exported version that passed its parity gate: ``models:/NAME@champion``
stays the name of the bundle to serve while versions are added."""
