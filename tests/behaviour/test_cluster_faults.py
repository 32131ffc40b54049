"""A node dies in the middle of a sweep (``nox -s cluster``): on a two-node cluster of its own (the node does not
come back, so the other cluster tests keep theirs), the worker node's raylet is SIGKILLed while a trial trains
there. The trial is retried from its last checkpoint on the node that is left (``--max-failures``, default 1),
and the sweep ends as an undisturbed one with the same seeds ends: every trial accounted for, none duplicated,
the same metrics and the same best configuration, the tune run and each trial run FINISHED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gssf_cli.cluster.durable_asha import REPLAYED
from tests.behaviour.test_cluster import (
    GSSF,
    TINY_BASE,
    Cluster,
    _gssf,
    _process_table,
    cluster,  # noqa: F401  (the module's own cluster)
    dataset,  # noqa: F401
)

pytestmark = pytest.mark.cluster

EPOCHS = 16


def _tune(data: Path, nodes: Cluster, storage: Path, store: str) -> list[str]:
    return ["--tracking-uri", store, "tune", "--data", str(data), "--address", nodes.address, "--param",
            "block_size=4,8", *TINY_BASE, "--epochs", str(EPOCHS), "--cpus-per-trial", "1", "--max-failures", "1",
            "--storage", str(storage), "--json"]  # fmt: skip


def _training_on_the_worker(nodes: Cluster, storage: Path) -> bool:
    """Both trials have reported an epoch, and one of them trains on the worker node (by its worker's pid) with at
    least a few epochs still to go, so that the node's death lands in the middle of it."""
    tables = [path.read_text().splitlines() for path in storage.glob("*/*/result.json")]
    if len([rows for rows in tables if rows]) < 2:
        return False
    return any(
        nodes.node_of(int(json.loads(rows[0])["pid"])) == ["worker"] and json.loads(rows[-1])["epoch"] <= EPOCHS - 4
        for rows in tables
    )


def _raylet_of(nodes: Cluster, node: str) -> int:
    leader = nodes.nodes[node].pid
    (pid,) = [pid for pid, ((_, _, name), _, group) in _process_table().items() if name == "raylet" and group == leader]
    return pid


def _check_one_run_per_trial(store: str, result: dict[str, Any]) -> None:
    """The store holds the tune run and one child per trial, all FINISHED, each epoch logged once."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (tune_run,) = [r for r in runs if r.data.tags.get("gssf.stage") == "tune"]
    assert tune_run.info.run_id == result["run_id"] and tune_run.info.status == "FINISHED"
    children = [r for r in runs if r is not tune_run]
    assert sorted(c.info.run_id for c in children) == sorted(t["run_id"] for t in result["trials"])
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_rsum")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (child.data.tags["gssf.tune.trial_id"], steps)


def _by_values(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {json.dumps(t["values"], sort_keys=True): t for t in result["trials"]}


def test_a_node_dying_mid_sweep_loses_no_trial_and_changes_no_result(
    cluster: Cluster,  # noqa: F811
    dataset: tuple[Path, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    data, _ = dataset
    undisturbed = _gssf(_tune(data, cluster, tmp_path / "undisturbed", f"sqlite:///{tmp_path}/undisturbed.db"),
                        tmp_path, cluster.env)  # fmt: skip
    assert undisturbed.returncode == 0, undisturbed.stderr
    expected = json.loads(undisturbed.stdout)

    store, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "storage"
    proc = subprocess.Popen([GSSF, *_tune(data, cluster, storage, store)], cwd=tmp_path, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed = False
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not killed:
            if _training_on_the_worker(cluster, storage):
                os.kill(_raylet_of(cluster, "worker"), signal.SIGKILL)
                killed = True
            time.sleep(0.1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, f"no trial trained on the worker node before the sweep ended: {err[-2000:]}"
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)

    found, wanted = _by_values(result), _by_values(expected)
    assert found.keys() == wanted.keys(), "every trial accounted for, none duplicated"
    for values, trial in found.items():
        assert trial["status"] == "FINISHED" and trial["epochs"] == EPOCHS, trial
        assert trial["metric"] == pytest.approx(wanted[values]["metric"], rel=1e-6), values
    assert result["best"]["values"] == expected["best"]["values"]
    _check_one_run_per_trial(store, result)
    assert "retrying from its last checkpoint" in err, "the trial on the dead node was retried"
    for trial in result["trials"]:
        rows = [json.loads(line) for line in (Path(trial["path"]) / "result.json").read_text().splitlines()]
        epochs = [int(row["epoch"]) for row in rows if not row.get(REPLAYED)]
        # The epoch in training when the node died, or one reported but not yet checkpointed, is trained again.
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)) and epochs.count(1) == 1, (trial["values"], epochs)
