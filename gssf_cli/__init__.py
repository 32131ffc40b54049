"""gssf: an experiment orchestrator for cross-modal metric learning with GSSF.

The package is usable as a library (``gssf_cli.training.loop.fit``, ``gssf_cli.evaluation.evaluate``,
``gssf_cli.evaluation.ranking``, ``gssf_cli.modeling.similarity``, ...; ``gssf_cli.stages`` for the same work as tracked MLflow
runs) and as the ``gssf`` command (``gssf_cli.cli.app``). Importing it is cheap: heavy dependencies load inside the code that needs them.
"""

__version__ = "0.1.0"
