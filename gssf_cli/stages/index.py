"""Stage ``index``: a bundle's gallery as a faiss index folder (:mod:`gssf_cli.deploy.index_folder`), tracked as a run.

The index is built and written first — every input checked before anything exists, the folder written through
a staging folder — and only then does the ``index`` MLflow run open, so bad input leaves neither a folder nor a
run. The run logs the config, the resolved index parameters (``spec.*``, defaults included), the build figures (and ``--eval``'s recall@10 and latency) as metrics, the
manifest as an artifact (not the index: it may weigh gigabytes, and it lives in the folder), and tags naming the
bundle's digest and the train run the bundle was exported from. With ``--log-model`` (or ``--register NAME``) the
run also logs the index folder and its bundle as an MLflow model that serves search
(:mod:`gssf_cli.deploy.served_search`), registered like an export's bundle, alias ``champion`` included.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli import __version__
from gssf_cli.core.config import to_dict
from gssf_cli.core.files import MANIFEST
from gssf_cli.core.stage_configs import IndexConfig
from gssf_cli.deploy import index_folder, indexes, served_search

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import Tracker


@dataclass(frozen=True)
class IndexResult:
    path: str
    run_id: str
    manifest: dict[str, Any]
    model_id: str | None = None
    registered: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        served = {"model_id": self.model_id} if self.model_id else {}
        return {"path": self.path, "run_id": self.run_id, **served,
                **({"registered": self.registered} if self.registered else {}), **self.manifest}  # fmt: skip


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
        model_id, registered = None, None
        if config.log_model or config.register is not None:
            model_id = _log_search_model(run_, built.path, manifest, tags)
            if config.register is not None:
                registered = run_.register_champion(
                    config.register,
                    model_id,
                    f"Search over index {built.path} ({manifest['kind']}, {manifest['count']:,} rows) with its bundle, "
                    f"logged by index run {run_.run_id}: mlflow models serve answers captions with the k best rows.",
                    {key: value for key, value in tags.items() if key != "gssf.index.path"},
                )
    return IndexResult(str(built.path), run_.run_id, manifest, model_id, registered)


SEARCH_REQUIREMENTS = ("onnxruntime", "faiss-cpu", "numpy")
"""What the served search model needs beside gssf itself: no torch, MLflow's server aside."""


def _log_search_model(run_: Any, folder: Path, manifest: dict[str, Any], tags: dict[str, str]) -> str:
    """The index folder and its bundle, linked into one staging folder beside the index, logged as the model."""
    with tempfile.TemporaryDirectory(prefix=".gssf-search-model-", dir=folder.parent) as staging:
        staged = served_search.stage_folder(folder, index_folder.recorded_bundle(folder, manifest), Path(staging))
        return str(
            run_.log_served_model(
                f"search-{manifest['kind']}-{run_.run_id[:6]}",
                staged,
                loader="gssf_cli.deploy.served_search:ServedSearch",
                requirements=[f"gssf=={__version__}", *SEARCH_REQUIREMENTS],
                tags={"gssf.stage": "index", **tags},
            )
        )
