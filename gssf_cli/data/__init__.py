"""Datasets: the on-disk format every stage reads, and the kinds ``gssf prepare`` can build.

A dataset folder holds split arrays plus ``manifest.json`` (kind, modalities and shapes, split counts,
source, seed, sha256 of every file, format version). See :mod:`gssf_cli.data.manifest`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gssf_cli.core.stage_configs import PrepareConfig

Writer = Callable[["PrepareConfig", Path], dict[str, Any]]
"""Writes one kind's split arrays into a staging folder; returns the manifest fields it knows."""

WRITERS: dict[str, str] = {
    "synthetic": "gssf_cli.data.synthetic:write_synthetic",
    "digits": "gssf_cli.data.digits:write_digits",
    "precomp": "gssf_cli.data.precomp:write_precomp",
    "features": "gssf_cli.data.features:write_features",
    "imbalance": "gssf_cli.data.imbalance:write_imbalance",
}
"""Dataset kind -> its writer, imported on first use (scikit-learn only for digits)."""


def writer(kind: str) -> Writer:
    module, _, name = WRITERS[kind].partition(":")
    found: Writer = getattr(importlib.import_module(module), name)
    return found
