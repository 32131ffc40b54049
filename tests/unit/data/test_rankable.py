"""Can a split measure retrieval? The minimums applied to class sizes, image counts and a written folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gssf_cli.core import limits
from gssf_cli.core.errors import UserInputError
from gssf_cli.data.rankable import check_prepared_splits, images_problem, labels_problem, split_problem


def test_the_split_rule() -> None:
    assert labels_problem([5]) is not None and "has 1 class " in str(labels_problem([5]))
    assert "has 0 classes" in str(labels_problem([]))
    assert "none with 2 items" in str(labels_problem([1, 1, 1]))
    assert labels_problem([2, 1]) is None and labels_problem([3, 4]) is None
    assert "has 1 image " in str(images_problem(1)) and "has 0 images" in str(images_problem(0))
    assert images_problem(limits.MIN_SPLIT_IMAGES) is None


def test_empty_classes_do_not_count() -> None:
    assert "has 1 class " in str(labels_problem([0, 4, 0]))


def test_a_label_split_is_judged_from_its_labels_file(tmp_path: Path) -> None:
    np.save(tmp_path / "dev_labels.npy", np.array([7, 7, 7]))
    np.save(tmp_path / "test_labels.npy", np.array([1, 2, 2]))
    fields = {"task": "labels", "splits": {"dev": {"items": 3}, "test": {"items": 3}}}
    assert "has 1 class " in str(split_problem(tmp_path, fields, "dev"))
    assert split_problem(tmp_path, fields, "test") is None


def test_prepare_refuses_too_few_classes_and_names_the_fix(tmp_path: Path) -> None:
    np.save(tmp_path / "train_labels.npy", np.array([0]))  # train is never judged
    np.save(tmp_path / "dev_labels.npy", np.array([3, 3]))
    fields = {
        "kind": "digits",
        "task": "labels",
        "splits": {"train": {"items": 1}, "dev": {"items": 2}},
    }
    with pytest.raises(UserInputError) as caught:
        check_prepared_splits(tmp_path, fields)
    message = str(caught.value)
    assert message.startswith("prepare: the dev split has 1 class (label-based retrieval needs at least 2 classes")
    assert message.endswith("; raise --dev-fraction")


def test_prepare_refuses_a_cross_modal_split_of_one_image(tmp_path: Path) -> None:
    fields = {"kind": "synthetic", "task": "cross_modal", "splits": {"train": {"images": 1}, "test": {"images": 1}}}
    with pytest.raises(
        UserInputError, match=r"^prepare: the test split has 1 image .*; raise --test-images to at least 2$"
    ):
        check_prepared_splits(tmp_path, fields)
    check_prepared_splits(tmp_path, {**fields, "splits": {"train": {"images": 1}, "test": {"images": 2}}})
