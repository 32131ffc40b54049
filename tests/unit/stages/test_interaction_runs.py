"""Runs of the interaction-based family (``gssf train --interaction``) end to end through a real MLflow SQLite store:
they train and learn, resume exactly, evaluate exactly (against a slow pair-by-pair reference written here),
evaluate approximately with ``--shortlist`` (saying what they missed), compare against an embedding run, and are
served by the MLflow model train logs with the interaction's scores, not the pooled embeddings' head."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from gssf_cli.cli.app import app
from gssf_cli.core.stage_configs import EvaluateConfig, PrepareConfig
from gssf_cli.data.dataset import TokenizedCaptions
from gssf_cli.evaluation.evaluate import evaluate_trained
from gssf_cli.modeling import checkpoint as ckpt
from gssf_cli.modeling.model import embed_split_tokens
from gssf_cli.stages.runs import load_trained
from gssf_cli.tracking.adapter import Tracker
from gssf_cli.training.loop import Trainer

EPOCHS = 4
TEST_IMAGES, DEV_IMAGES, CAPTIONS_PER_IMAGE = 20, 60, 5
SMALL = ["--data", "data/syn", "--metric", "gssf", "--block-size", "8", "--embed-dim", "32", "--word-dim", "16",
         "--batch-size", "32", "--lr", "0.004", "--device", "cpu", "--threads", "1", "--seed", "5"]  # fmt: skip
SCAN = ["--interaction", "scan-t2i", *SMALL, "--epochs", str(EPOCHS)]
MAXSIM = ["--interaction", "maxsim", *SMALL, "--epochs", str(EPOCHS)]
EMBEDDING = ["--interaction", "none", *SMALL, "--epochs", "1"]
RECALLS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
ENV_NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "140", "NO_COLOR": "1"})


def _ok(*args: str) -> dict[str, Any]:
    result = _invoke(*args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _quality(metrics: dict[str, float]) -> dict[str, float]:
    """Everything but the throughput, which depends on the machine's load."""
    return {k: v for k, v in metrics.items() if k != "samples_per_s"}


class Runs:
    """The shared store: ``root`` (the working directory, with ``data/syn``), and the train results (``--json``)
    of ``scan`` (scan-t2i over gssf d8), ``maxsim`` and ``embedding`` (--interaction none)."""

    def __init__(self, root: Path, trained: dict[str, dict[str, Any]]) -> None:
        self.root = root
        self.trained = trained

    def id(self, name: str) -> str:
        return str(self.trained[name]["run_id"])


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """``--threads 1`` (the same arithmetic in every run) must not slow the rest of the session down."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, _restore_torch_threads: None) -> Iterator[Runs]:
    from gssf_cli.stages import prepare

    root = tmp_path_factory.mktemp("interaction")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in ENV_NAMES:
            mp.delenv(name, raising=False)
        syn = PrepareConfig(
            dataset="synthetic", out=Path("data/syn"), train_images=300, dev_images=DEV_IMAGES,
            test_images=TEST_IMAGES, regions=6, region_dim=16, concepts=12, vocab_size=80,
        )  # fmt: skip
        prepare.run(syn, Tracker())
        trained = {
            name: _ok("train", *args) for name, args in (("scan", SCAN), ("maxsim", MAXSIM), ("embedding", EMBEDDING))
        }
        yield Runs(root, trained)


@pytest.fixture
def inside(runs: Runs, monkeypatch: pytest.MonkeyPatch) -> Runs:
    monkeypatch.chdir(runs.root)
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return runs


def _chance_rsum(n: int, k: int) -> float:
    """rSum of a random ranking of ``n`` images and ``k·n`` captions: image→text finds one of ``k`` positives
    among ``k·n`` captions in the top K, text→image its one image among ``n``."""
    i2t = sum(1 - math.comb(k * n - k, cut) / math.comb(k * n, cut) for cut in (1, 5, 10))
    t2i = sum(cut / n for cut in (1, 5, 10))
    return 100 * (i2t + t2i)


# ---------------------------------------------------------------------------------------------------------
# train


@pytest.mark.parametrize(("name", "kind"), [("scan", "scan-t2i"), ("maxsim", "maxsim")])
def test_interaction_runs_train_and_learn(inside: Runs, name: str, kind: str) -> None:
    out = inside.trained[name]
    run_id = out["run_id"]
    client = Tracker().client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"train-{kind}-gssf-d8-{run_id[:6]}"
    assert run.data.params["train.interaction"] == kind and run.data.params["train.metric"] == "gssf"
    assert out["validation_metric"] == "rsum" and out["epochs_run"] == EPOCHS
    history = [m.value for m in sorted(client.get_metric_history(run_id, "val_rsum"), key=lambda m: m.step)]
    assert len(history) == EPOCHS
    chance = _chance_rsum(DEV_IMAGES, CAPTIONS_PER_IMAGE)  # about 52; these runs reach about 270 or more
    assert max(history) > 3 * chance, (history, chance)
    assert max(history[1:]) > history[0] + 50, f"no learning after the first epoch: {history}"
    assert out["metrics"]["val_rsum"] == max(history), "the best epoch's metrics are the result"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoint", "config"}


def test_a_run_interrupted_after_epoch_1_resumes_to_the_uninterrupted_result(
    inside: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same seed and settings as the ``scan`` run, interrupted (Ctrl-C) as epoch 2 starts, then ``--resume``d:
    the same metrics and, tensor for tensor, the same best and last weights."""
    reference = inside.trained["scan"]
    real_epoch = Trainer._train_epoch

    def interrupted(self: Trainer, epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "_train_epoch", interrupted)
        killed = _invoke("train", *SCAN)
    assert killed.exit_code == 130, (killed.stdout, killed.stderr)
    client = Tracker().client
    (run,) = [r for r in client.search_runs([client.get_run(reference["run_id"]).info.experiment_id],
                                             filter_string="attributes.status = 'KILLED'")]  # fmt: skip
    run_id = run.info.run_id
    assert run.info.run_name == f"train-scan-t2i-gssf-d8-{run_id[:6]}"
    assert ckpt.saved_state(Path("runs") / run_id / ckpt.LAST)["epochs_done"] == 1

    resumed = _ok("train", "--resume", run_id)
    assert resumed["run_id"] == run_id and resumed["epochs_run"] == EPOCHS - 1
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert _quality(resumed["metrics"]) == _quality(reference["metrics"])
    for folder in (ckpt.BEST, ckpt.LAST):
        got = load_file(str(Path("runs") / run_id / folder / ckpt.MODEL))
        want = load_file(str(Path("runs") / reference["run_id"] / folder / ckpt.MODEL))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), folder
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_rsum")]
    assert sorted(steps) == list(range(1, EPOCHS + 1)), "each epoch logged once"


# ---------------------------------------------------------------------------------------------------------
# evaluate


def _reference_scores(model: Any, dataset: Any) -> np.ndarray:
    """``[N, kN]``: every (image, caption) pair of the test split scored on its own, the caption cut to its valid
    words, by the model's interaction — a plain loop, one pair per call."""
    split = dataset.split("test")
    tokens = embed_split_tokens(model, split, torch.device("cpu"))
    n, m = tokens.regions.shape[0], tokens.words.shape[0]
    scores = np.empty((n, m), dtype=np.float64)
    with torch.no_grad():
        for i in range(n):
            for j in range(m):
                words = int(tokens.mask[j].sum())
                pair = model.interaction(
                    tokens.regions[i : i + 1], tokens.words[j : j + 1, :words], tokens.mask[j : j + 1, :words]
                )
                scores[i, j] = float(pair[0, 0])
    return scores


def _reference_recalls(scores: np.ndarray, k: int, cuts: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent of a full ``[N, kN]`` matrix (caption ``j`` belongs to image ``j // k``), pessimistic on
    ties: an item that scores the same as the positive ranks above it."""
    n, m = scores.shape
    i2t_ranks, t2i_ranks = [], []
    for i in range(n):
        positives = set(range(k * i, k * i + k))
        best = max(scores[i, j] for j in positives)
        i2t_ranks.append(sum(1 for j in range(m) if j not in positives and scores[i, j] >= best))
    for j in range(m):
        mine = j // k
        t2i_ranks.append(sum(1 for i in range(n) if i != mine and scores[i, j] >= scores[mine, j]))
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for cut in cuts:
            out[f"{name}_r{cut}"] = 100.0 * sum(rank < cut for rank in ranks) / len(ranks)
    return out


@pytest.mark.parametrize("name", ["scan", "maxsim"])
def test_exact_metrics_equal_a_pair_by_pair_reference(inside: Runs, name: str) -> None:
    _, model, dataset = load_trained(Tracker(), inside.id(name))
    assert model.interaction is not None
    scores = _reference_scores(model, dataset)
    assert scores.shape == (TEST_IMAGES, CAPTIONS_PER_IMAGE * TEST_IMAGES)
    expected = _reference_recalls(scores, CAPTIONS_PER_IMAGE)
    assert 0 < sum(expected.values()) < 600, "a model that ranks neither everything first nor last"

    outcome = evaluate_trained(model, dataset, EvaluateConfig(run=inside.id(name), plots=False))
    assert outcome.result.shortlist is None, "exact by default"
    assert {key: outcome.result.metrics[key] for key in RECALLS} == pytest.approx(expected, abs=1e-9)
    assert outcome.result.metrics["rsum"] == pytest.approx(sum(expected.values()))
    assert outcome.result.model_info["interaction"]["kind"] == model.interaction.kind

    cli = _ok("evaluate", "--run", inside.id(name), "--no-plots")
    assert "shortlist" not in cli
    assert {key: cli[key] for key in RECALLS} == pytest.approx(expected, abs=1e-9)
    assert cli["sizes"] == {"images": TEST_IMAGES, "texts": CAPTIONS_PER_IMAGE * TEST_IMAGES}


def test_a_shortlist_as_long_as_the_gallery_is_exact(inside: Runs) -> None:
    exact = _ok("evaluate", "--run", inside.id("scan"), "--no-plots")
    every = CAPTIONS_PER_IMAGE * TEST_IMAGES
    out = _ok("evaluate", "--run", inside.id("scan"), "--no-plots", "--shortlist", str(every))
    for key in (*RECALLS, "rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"):
        assert out[key] == pytest.approx(exact[key], abs=1e-9), key
    report = out["shortlist"]
    assert report["k"] == every and report["approximate"] is True
    assert report["audited_queries"] == {"image→text": TEST_IMAGES, "text→image": every}
    assert report["missed_top10"] == {"image→text": 0, "text→image": 0}
    assert report["of_top10"] == {"image→text": 10 * TEST_IMAGES, "text→image": 10 * every}


@pytest.mark.parametrize("k", [1, 3])
def test_a_short_shortlist_says_it_is_approximate_and_what_it_missed(inside: Runs, k: int) -> None:
    out = _ok("evaluate", "--run", inside.id("scan"), "--no-plots", "--shortlist", str(k))
    report = out["shortlist"]
    assert report["k"] == k and report["approximate"] is True
    assert set(report["missed_top10"]) == set(report["of_top10"]) == set(report["audited_queries"])
    for direction, missed in report["missed_top10"].items():
        assert 0 <= missed <= report["of_top10"][direction] == 10 * report["audited_queries"][direction], direction
    assert 0 <= out["rsum"] <= 600 and all(0 <= out[key] <= 100 for key in RECALLS)
    run = Tracker().client.get_run(out["run_id"])
    assert run.data.params["evaluate.shortlist"] == str(k) and run.data.tags["gssf.source_run"] == inside.id("scan")


# ---------------------------------------------------------------------------------------------------------
# compare


def test_an_interaction_run_compares_with_an_embedding_run(inside: Runs) -> None:
    scan, embedding = inside.id("scan"), inside.id("embedding")
    out = _ok("compare", scan, embedding, "--bootstrap", "200", "--permutations", "200", "--no-plots")
    assert out["units"] == TEST_IMAGES and out["unit"] == f"image with its {CAPTIONS_PER_IMAGE} captions"
    assert out["baseline"]["runs"][0]["run_id"] == scan and out["compared"][0]["runs"][0]["run_id"] == embedding
    rows = {row["metric"]: row for row in out["rows"]}
    assert "rsum" in rows
    for run_id, side in ((scan, "baseline"), (embedding, "other")):
        evaluated = _ok("evaluate", "--run", run_id, "--no-plots")
        for metric, row in rows.items():
            assert row[side] == pytest.approx(evaluated[metric], rel=1e-9), (side, metric)
    for row in rows.values():
        assert row["difference"] == pytest.approx(row["other"] - row["baseline"], abs=1e-9)
        assert row["ci_low"] <= row["ci_high"] and 0.0 < row["p_value"] <= 1.0


# ---------------------------------------------------------------------------------------------------------
# the served model


def test_the_logged_model_serves_the_interaction_scores(inside: Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    out = inside.trained["scan"]
    assert out["model_id"]
    tracker = Tracker()
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)  # restored after the test
    mlflow.set_tracking_uri(tracker.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{out['model_id']}")
    images = np.load(inside.root / "data/syn/test_ims.npy")[:3].astype(np.float32)
    texts = (inside.root / "data/syn/test_caps.txt").read_text(encoding="utf-8").splitlines()[:4]
    texts = [*texts, "a caption of words the vocabulary may not know"]
    predicted = served.predict({"images": images, "texts": texts})
    assert predicted["scores"].shape == (3, len(texts))

    _, model, dataset = load_trained(tracker, out["run_id"])
    assert dataset.vocab is not None
    model.eval()
    tokens, lengths = TokenizedCaptions(texts, dataset.vocab).batch(np.arange(len(texts)))
    with torch.no_grad():
        expected = model.token_scores(model.encode_tokens(torch.from_numpy(images), tokens, lengths)).numpy()
        pooled = model.scores(
            torch.from_numpy(predicted["image_embeddings"]), torch.from_numpy(predicted["text_embeddings"])
        ).numpy()
    np.testing.assert_allclose(predicted["scores"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(predicted["scores"], pooled, atol=1e-3), "the pooled embeddings' head, not the interaction"
