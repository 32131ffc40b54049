"""gssf: an experiment orchestrator for cross-modal metric learning with GSSF.

The package is usable as a library (``gssf_cli.stages``, ``gssf_cli.retrieval``, ...) and as the ``gssf``
command (``gssf_cli.app``). Importing it is cheap: heavy dependencies load inside the code that needs them.
"""

__version__ = "0.1.0"
