"""Names of the tracking model that stages write and run lookup reads (standard library only, so a stage module can
name them without importing mlflow)."""

from __future__ import annotations

FINAL_RUN_TAG = "gssf.final_run"
"""On a pipeline run: its final train run (the retrained best config when the tune retrains)."""
PIPELINE_STAGE = "run"
"""The stage of ``gssf run``'s parent run; its children are the stages' runs."""
SEEDS_STAGE = "seeds"
"""The stage of a ``gssf train --seeds`` run; its children are the ``train`` runs, one per seed (``gssf compare``
takes such a run as the group of its children)."""
