"""Stage ``index``: the index is checked and built before its run opens, so bad input leaves neither an index
folder nor a run (building real indexes: tests/unit/deploy/test_search.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.stage_configs import IndexConfig
from gssf_cli.stages import index


def test_a_folder_that_is_not_a_bundle_is_refused_before_the_tracker_is_used(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    np.save(tmp_path / "gallery.npy", np.ones((4, 3), dtype=np.float32))
    config = IndexConfig(bundle=tmp_path / "bundle", gallery=tmp_path / "gallery.npy", out=tmp_path / "indexes" / "i")
    # No tracker at all: a stage that opened its run (or touched the store) first would fail otherwise.
    with pytest.raises(UserInputError, match=r"bundle: no manifest\.json, not a gssf ONNX bundle"):
        index.run(config, tracker=None)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "gallery.npy"]


def test_the_result_as_json() -> None:
    result = index.IndexResult("indexes/i", "r1", {"kind": "flat", "count": 4})
    assert result.to_json() == {"path": "indexes/i", "run_id": "r1", "kind": "flat", "count": 4}
