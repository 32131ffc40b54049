"""Stage ``prepare``: turn a source into a verified dataset folder, recorded as an MLflow run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gssf_cli.core.config import to_dict
from gssf_cli.core.files import MANIFEST, check_output_folder, manifest_digest, staged_folder
from gssf_cli.core.stage_configs import PrepareConfig
from gssf_cli.data import imbalance, synthetic, writer
from gssf_cli.data.manifest import write_manifest
from gssf_cli.data.rankable import check_prepared_splits

if TYPE_CHECKING:
    from gssf_cli.tracking.adapter import Tracker


@dataclass(frozen=True)
class PrepareResult:
    name: str
    kind: str
    task: str
    path: str
    splits: dict[str, dict[str, Any]]
    manifest_sha256: str
    bytes: int
    seconds: float
    run_id: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(config: PrepareConfig, tracker: Tracker | None = None, parent_run_id: str | None = None) -> PrepareResult:
    """Build ``config.out`` atomically (nothing is left behind on failure), then log it as a run.

    A dev/test split that cannot rank anything (see :mod:`gssf_cli.data.rankable`) is refused before the
    folder is moved into place.

    The output folder and, for generated data, the memory and disk the sizes need are checked first, then the
    tracking store is contacted before any work so that a wrong ``--tracking-uri`` fails fast.
    """
    check_output_folder(config.out, config.force)
    if config.dataset == "synthetic":
        synthetic.check_size(config, config.out)
    if tracker is not None:
        _ = tracker.experiment_id
    started = time.perf_counter()
    settings = {k: v for k, v in to_dict(config).items() if k not in ("out", "force")}
    with staged_folder(config.out, config.force) as staging:
        fields = writer(config.dataset)(config, staging)
        if config.dataset == "synthetic" and config.imbalanced():
            imbalanced = imbalance.Imbalance.of(config)
            imbalance.check(fields, imbalanced, staging, str(config.out))
            fields["imbalance"] = imbalance.apply(staging, fields, imbalanced, config.seed)
        check_prepared_splits(staging, {"kind": config.dataset, **fields})
        manifest = write_manifest(
            staging, {"name": config.out.name, "kind": config.dataset, **fields, "settings": settings}
        )
    seconds = time.perf_counter() - started
    result = PrepareResult(
        name=config.out.name,
        kind=config.dataset,
        task=manifest["task"],
        path=str(config.out),
        splits=manifest["splits"],
        manifest_sha256=manifest_digest(config.out),
        bytes=sum(f["bytes"] for f in manifest["files"].values()),
        seconds=round(seconds, 3),
        run_id=None,
    )
    if tracker is None:
        return result
    with tracker.start_run("prepare", run_name=f"prepare-{result.name}", parent_run_id=parent_run_id) as run_:
        run_.log_config("prepare", to_dict(config))
        run_.log_dataset(result.name, config.out, result.manifest_sha256, context="prepare", tags={"kind": result.kind})
        run_.log_artifact(config.out / MANIFEST, "dataset")
        metrics: dict[str, float] = {"seconds": seconds, "bytes": float(result.bytes)}
        for split, counts in result.splits.items():
            metrics.update({f"{split}_{k}": v for k, v in counts.items() if isinstance(v, int)})
        run_.log_metrics(metrics)
    return PrepareResult(**{**asdict(result), "run_id": run_.run_id})
