"""The training loop, and the tune plan and its results (pure: Ray lives in :mod:`gssf_cli.cluster`)."""
