"""Stage ``index``: a bundle's gallery as a faiss index folder (:mod:`gssf_cli.deploy.index_folder`), tracked as a run.

The index is built and written first — every input checked before anything exists, the folder written through
a staging folder — and only then does the ``index`` MLflow run open, so bad input leaves neither a folder nor a
run. The run logs the config, the resolved index parameters (``spec.*``, defaults included), the build figures (and ``--eval``'s recall@10 and latency) as metrics, the
manifest as an artifact (not the index: it may weigh gigabytes, and it lives in the folder), and tags naming the
bundle's digest and the train run the bundle was exported from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gssf_cli.core.config import to_dict
from gssf_cli.core.files import MANIFEST
from gssf_cli.core.stage_configs import IndexConfig
from gssf_cli.deploy import index_folder, indexes

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import Tracker


@dataclass(frozen=True)
class IndexResult:
    path: str
    run_id: str
    manifest: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "run_id": self.run_id, **self.manifest}


def run(
    config: IndexConfig,
    tracker: Tracker,
    progress: index_folder.Progress | None = None,
    parent_run_id: str | None = None,
) -> IndexResult:
    """Build ``config``'s index, then record it as an ``index`` run."""
    built = indexes.build(config, progress)
    manifest = built.manifest
    tags = {"gssf.bundle.digest": manifest["bundle"]["digest"], "gssf.index.path": str(built.path)}
    if manifest["bundle"]["source_run_id"]:
        tags["gssf.source_run"] = str(manifest["bundle"]["source_run_id"])
    tokens = "tokens-" if manifest.get("family") == "interaction" else ""
    with tracker.start_run(
        "index", run_name=f"index-{tokens}{manifest['kind']}", parent_run_id=parent_run_id, tags=tags
    ) as run_:
        run_.log_config("index", to_dict(config))
        searched = {**manifest["spec"]["search"], **manifest.get("late_interaction", {})}
        run_.log_params({**manifest["spec"]["build"], **searched}, prefix="spec.")
        run_.log_metrics(index_folder.manifest_metrics(manifest))
        run_.log_artifact(built.path / MANIFEST, "index")
    return IndexResult(str(built.path), run_.run_id, manifest)
