"""Stage ``export``: a trained run as an ONNX bundle (:mod:`gssf_cli.deploy.onnx_export`), tracked as an MLflow run.

The export run logs the config, the parity report as metrics, the bundle's manifest, and the bundle as one
MLflow model (``mlflow.pyfunc.load_model`` serves it on ONNX Runtime, no torch: :class:`gssf_cli.deploy.bundle.
BundleModel`), named ``<model>-onnx-<export run short id>``. With ``--register NAME`` that model becomes a new
version of the registered model NAME, linked to the export run (whose ``gssf.source_run`` tag names the train
run), and takes the alias ``champion`` (:data:`~gssf_cli.tracking.tags.CHAMPION_ALIAS`) from the version before:
``models:/NAME@champion`` is always the newest bundle that passed its gate. A failed parity gate deploys nothing:
the bundle is kept as ``<out>.failed`` (the result's ``path``), the run still logs the metrics and the manifest but
no model, registers nothing, and ends FAILED.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssf_cli import __version__
from gssf_cli.core.config import to_dict
from gssf_cli.core.files import MANIFEST
from gssf_cli.core.stage_configs import ExportConfig
from gssf_cli.deploy.bundle import verify_bundle

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import Tracker

__all__ = ["ExportResult", "run", "verify_bundle"]


@dataclass(frozen=True)
class ExportResult:
    path: str
    run_id: str
    export_run_id: str | None
    passed: bool
    model_id: str | None
    graphs: dict[str, dict[str, Any]]
    parity: dict[str, Any]
    seconds: float = 0.0
    registered: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(config: ExportConfig, tracker: Tracker, parent_run_id: str | None = None) -> ExportResult:
    """Export ``config.run`` and gate it on parity; the bundle lands in ``config.out`` (or exports/RUN)."""
    from gssf_cli.core.files import check_output_folder, check_writable
    from gssf_cli.deploy import onnx_export
    from gssf_cli.stages.runs import load_trained

    if config.out is not None:
        check_output_folder(config.out, config.force)
    else:
        check_writable(Path("exports"), "output folder exports", "--out")
    train_run, model, dataset = load_trained(tracker, config.run)
    run_id = train_run.info.run_id
    out = config.out or Path("exports") / run_id
    started = time.perf_counter()
    written = onnx_export.write_bundle(model, dataset, out, config, run_id)
    seconds = time.perf_counter() - started
    graphs, parity = written.manifest["graphs"], written.manifest["parity"]
    label = model.label()
    model_id, registered = None, None
    with tracker.start_run(
        "export", run_name=f"export-{label}", parent_run_id=parent_run_id, tags={"gssf.source_run": run_id}
    ) as run_:
        run_.log_config("export", to_dict(config))
        run_.log_metrics(onnx_export.parity_metrics(parity) | {"seconds": seconds, "passed": float(written.passed)})
        run_.log_artifact(written.path / MANIFEST, "bundle")
        if written.passed:
            model_id = run_.log_served_model(
                f"{label}-onnx-{run_.run_id[:6]}",
                written.path,
                loader="gssf_cli.deploy.bundle:BundleModel",
                requirements=[f"gssf=={__version__}", "onnxruntime", "numpy"],
                tags={"gssf.stage": "export", "gssf.source_run": run_id},
            )
            if config.register is not None:
                registered = run_.register_champion(
                    config.register,
                    model_id,
                    f"ONNX bundle of train run {run_id} ({label}), exported by run {run_.run_id}; parity gate "
                    f"passed. mlflow.pyfunc.load_model serves it on ONNX Runtime.",
                    {"gssf.source_run": run_id, "gssf.metric": label},
                )
        else:
            run_.set_tags({"gssf.export.failed_bundle": str(written.path)})
            run_.mark_failed()
    return ExportResult(
        str(written.path), run_id, run_.run_id, written.passed, model_id, graphs, parity, round(seconds, 2), registered
    )
