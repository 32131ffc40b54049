"""The defaults train: ``gssf train`` given only ``--data``, ``--epochs`` and the issue's head and size (``--metric
cosine --embed-dim 64``) lands within 5 % of a plain reference dual encoder on real data it was never tuned on, for
a short and a long budget (20 and 60 epochs).

The data: scikit-learn's bundled handwritten digits (1,797 real 8×8 scans) as a two-view retrieval problem —
the top half of each digit (32 pixels) is the "image", the bottom half the "text", and each half must find its
own other half among the test split's (instance-level, not class-level: other scans of the same digit are
negatives). ``gssf prepare --dataset features`` splits it 70/10/20.

The reference is what one writes by hand (and what the issue measured gssf against): per side a two-layer MLP
(hidden 1,024, out 1,024), L2 norm, Adam at 1e-3, batch 128, the bidirectional hinge with hardest negatives
(margin 0.2), every epoch at the same rate, the last epoch's weights on the test split. Before this test
existed, gssf's defaults ran 45 of 60 epochs at a tenth of the rate and gave a features dataset one linear
projection.

The learning rate, left unset, follows the budget (:func:`gssf_cli.core.limits.auto_lr`): 2e-3 for the few hundred
optimizer steps here (1,258 pairs in batches of 128: 200 steps in 20 epochs, 600 in 60), 5e-4 at the paper's
scale. Both ends are shown: on this small problem the rule beats the paper's fixed rate (with the issue's D = 64
and cosine head) and reaches the reference; the paper's F30K recipe, its ``lr`` line removed, resolves to 5e-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import Result

from gssf_cli.core import limits
from gssf_cli.core.config import from_dict, load_toml
from gssf_cli.core.stage_configs import TrainConfig
from gssf_cli.data.dataset import Dataset
from gssf_cli.evaluation.crossmodal import evaluate_cross_modal
from gssf_cli.tracking.adapter import Tracker
from gssf_cli.training.loop import budget_steps, resolve_lr

Gssf = Callable[..., Result]
WITHIN = 0.95
PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
F30K_TRAIN = {"task": "cross_modal", "splits": {"train": {"images": 29_000, "captions": 145_000}}}
"""What the trainer reads of F30K precomp's manifest to count a budget's steps: 29,000 train images, 5 captions each."""
_references: dict[tuple[str, int], float] = {}


@pytest.fixture
def halves(gssf: Gssf, workdir: Path) -> Path:
    from sklearn.datasets import load_digits

    pixels = load_digits().data.astype(np.float32) / 16.0
    np.savez(workdir / "halves.npz", images=pixels[:, :32], texts=pixels[:, 32:])
    prepared = gssf("prepare", "--dataset", "features", "--source", "halves.npz", "--out", "data/halves")
    assert prepared.exit_code == 0, prepared.stderr
    return workdir / "data" / "halves"


def reference_rsum(data: Path, epochs: int, seed: int = 0) -> float:
    """Test rSum of the hand-written reference dual encoder (module docstring) after ``epochs`` epochs."""
    torch.manual_seed(seed)

    def arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(np.load(data / f"{split}_{side}.npy")) for side in ("ims", "txts"))  # type: ignore[return-value]

    def tower(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(width, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))

    images, texts = arrays("train")
    image_tower, text_tower = tower(images.shape[1]), tower(texts.shape[1])
    optimizer = torch.optim.Adam([*image_tower.parameters(), *text_tower.parameters()], lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=order).split(128):
            a = torch.nn.functional.normalize(image_tower(images[batch]), dim=1)
            b = torch.nn.functional.normalize(text_tower(texts[batch]), dim=1)
            scores = a @ b.T
            positive = scores.diagonal()
            others = ~torch.eye(len(batch), dtype=torch.bool)
            to_texts = (0.2 + scores - positive[:, None]).clamp(min=0) * others
            to_images = (0.2 + scores - positive[None, :]).clamp(min=0) * others
            loss = to_texts.amax(dim=1).sum() + to_images.amax(dim=0).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        test_images, test_texts = arrays("test")
        a = torch.nn.functional.normalize(image_tower(test_images), dim=1)
        b = torch.nn.functional.normalize(text_tower(test_texts), dim=1)
    return float(evaluate_cross_modal(a, b, captions_per_image=1)["rsum"])


def cached_reference_rsum(data: Path, epochs: int) -> float:
    """:func:`reference_rsum`, computed once per dataset and budget in this process (two tests compare with it)."""
    key = (Dataset(data).digest, epochs)
    if key not in _references:
        _references[key] = reference_rsum(data, epochs)
    return _references[key]


def gssf_rsum(gssf: Gssf, data: Path, epochs: int, *flags: str) -> tuple[float, float]:
    """Test rSum of ``gssf train --data DATA --epochs EPOCHS FLAGS`` (``--metric gssf`` unless flagged) and the
    learning rate its run recorded."""
    metric = () if "--metric" in flags else ("--metric", "gssf")
    trained = gssf("train", "--data", str(data), *metric, "--epochs", str(epochs), *flags, "--json")
    assert trained.exit_code == 0, trained.stderr
    run_id = json.loads(trained.stdout)["run_id"]
    evaluated = gssf("evaluate", "--run", run_id, "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    lr = float(Tracker().client.get_run(run_id).data.params["train.lr"])
    return float(json.loads(evaluated.stdout)["rsum"]), lr


def auto_lr_of(data: Path, epochs: int) -> float:
    """The rate the rule gives a run of ``epochs`` epochs at the default batch size on ``data``."""
    return limits.auto_lr(budget_steps(TrainConfig(data=data, epochs=epochs), Dataset(data).manifest))


SMALL = ("--metric", "cosine", "--embed-dim", "64")
"""The issue's setting: a cosine head at D = 64, every other setting default."""


def test_defaults_reach_the_reference_dual_encoder(gssf: Gssf, halves: Path) -> None:
    """60 epochs (600 optimizer steps); the 20-epoch budget is the next test's."""
    epochs = 60
    (ours, lr), reference = gssf_rsum(gssf, halves, epochs, *SMALL), cached_reference_rsum(halves, epochs)
    assert ours >= WITHIN * reference, f"gssf defaults {ours:.1f} vs reference {reference:.1f} test rSum"
    assert lr == pytest.approx(auto_lr_of(halves, epochs)) and lr > limits.AUTO_LR, "the run records the rate it used"


def test_on_a_small_budget_the_rule_beats_the_paper_rate(gssf: Gssf, halves: Path) -> None:
    """The issue's head and size (cosine, D = 64) for 200 optimizer steps: the rule's 2e-3 against the paper's
    5e-4 (measured 350 against 313 test rSum; the reference 236)."""
    (ours, lr), (paper, _) = gssf_rsum(gssf, halves, 20, *SMALL), gssf_rsum(gssf, halves, 20, *SMALL, "--lr", "5e-4")
    reference = cached_reference_rsum(halves, 20)
    assert lr == limits.AUTO_LR_SMALL
    assert ours > paper, f"the rule's rate {ours:.1f} vs the paper's {paper:.1f} test rSum"
    assert ours >= WITHIN * reference, f"gssf defaults {ours:.1f} vs reference {reference:.1f} test rSum"


def test_at_the_paper_scale_the_rule_gives_the_paper_rate() -> None:
    """The F30K precomp recipe (25 epochs of 145,000 pairs in batches of 128: 28,325 steps) without its ``lr`` line
    trains at the rate it names, the host frameworks' 5e-4; an explicit rate still wins."""
    recipe = load_toml(PIPELINES / "f30k-precomp.toml")["train"]
    assert recipe["lr"] == limits.AUTO_LR
    unset = from_dict(TrainConfig, {k: v for k, v in recipe.items() if k != "lr"} | {"data": "data/f30k"}, "train")
    assert unset.lr is None and budget_steps(unset, F30K_TRAIN) == 28_325
    assert resolve_lr(unset, F30K_TRAIN).lr == limits.AUTO_LR
    given = from_dict(TrainConfig, recipe | {"data": "data/f30k", "lr": 2e-4}, "train")
    assert resolve_lr(given, F30K_TRAIN).lr == 2e-4
