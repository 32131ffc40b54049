"""gssf: an experiment orchestrator for cross-modal metric learning with GSSF.

The package is usable as a library (``gssf_cli.training.fit``, ``gssf_cli.evaluation``,
``gssf_cli.retrieval``, ``gssf_cli.similarity``, ...; ``gssf_cli.stages`` for the same work as tracked MLflow
runs) and as the ``gssf`` command (``gssf_cli.app``). Importing it is cheap: heavy dependencies load inside the code that needs them.
"""

__version__ = "0.1.0"
