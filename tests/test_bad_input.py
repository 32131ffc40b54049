"""Every malformed input to ``gssf prepare`` exits 2 with one readable line and leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import Result

from tests.conftest import tiny_synthetic_args
from tests.factories import write_feature_folder, write_precomp

Gssf = Callable[..., Result]
Setup = Callable[[Path], list[str]]


def _precomp(workdir: Path, **kwargs: object) -> Path:
    return write_precomp(workdir / "src", **kwargs)  # type: ignore[arg-type]


def _missing_source(w: Path) -> list[str]:
    return ["prepare", "--dataset", "precomp", "--source", "nowhere", "--out", "data/x"]


def _wrong_shape(w: Path) -> list[str]:
    src = _precomp(w)
    np.save(src / "dev_ims.npy", np.zeros((3, 2, 2, 2), dtype=np.float32))
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _wrong_dtype(w: Path) -> list[str]:
    src = _precomp(w)
    np.save(src / "dev_ims.npy", np.zeros((3, 3, 6), dtype=np.int32))
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _caption_count(w: Path) -> list[str]:
    src = _precomp(w)
    lines = (src / "test_caps.txt").read_text().splitlines()
    (src / "test_caps.txt").write_text("\n".join(lines[:-2]) + "\n")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _nan(w: Path) -> list[str]:
    src = _precomp(w)
    ims = np.load(src / "train_ims.npy")
    ims[5, 1, 2] = np.nan
    np.save(src / "train_ims.npy", ims)
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _inf(w: Path) -> list[str]:
    src = write_feature_folder(w / "src")
    texts = np.load(src / "dev_texts.npy")
    texts[0, 0] = np.inf
    np.save(src / "dev_texts.npy", texts)
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _empty_split(w: Path) -> list[str]:
    src = _precomp(w)
    np.save(src / "dev_ims.npy", np.zeros((0, 3, 6), dtype=np.float32))
    (src / "dev_caps.txt").write_text("")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _non_utf8(w: Path) -> list[str]:
    src = _precomp(w)
    (src / "train_caps.txt").write_bytes((src / "train_caps.txt").read_bytes() + "café\n".encode("latin-1"))
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _empty_caption(w: Path) -> list[str]:
    src = _precomp(w)
    lines = (src / "dev_caps.txt").read_text().splitlines()
    lines[4] = "   "
    (src / "dev_caps.txt").write_text("\n".join(lines) + "\n")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _missing_captions(w: Path) -> list[str]:
    src = _precomp(w)
    (src / "dev_caps.txt").unlink()
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _corrupt_npy(w: Path) -> list[str]:
    src = _precomp(w)
    (src / "train_ims.npy").write_bytes(b"\x93NUMPY garbage")
    return ["prepare", "--dataset", "precomp", "--source", "src", "--out", "data/x"]


def _labels_mismatch(w: Path) -> list[str]:
    src = write_feature_folder(w / "src", paired=False)
    np.save(src / "test_labels.npy", np.zeros(5, dtype=np.int64))
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _labels_not_integer(w: Path) -> list[str]:
    src = write_feature_folder(w / "src", paired=False)
    np.save(src / "train_labels.npy", np.zeros(12, dtype=np.float32))
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _texts_not_multiple(w: Path) -> list[str]:
    src = write_feature_folder(w / "src")
    np.save(src / "train_texts.npy", np.zeros((13, 7), dtype=np.float32))
    return ["prepare", "--dataset", "features", "--source", "src", "--out", "data/x"]


def _output_exists(w: Path) -> list[str]:
    (w / "data" / "x").mkdir(parents=True)
    (w / "data" / "x" / "keep.txt").write_text("mine")
    return [*tiny_synthetic_args("data/x")]


def _unwritable_output(w: Path) -> list[str]:
    (w / "data").write_text("a file where a folder should be")
    return [*tiny_synthetic_args("data/x")]


def _unknown_kind(w: Path) -> list[str]:
    return ["prepare", "--dataset", "imagenet", "--out", "data/x"]


def _unknown_config_key(w: Path) -> list[str]:
    (w / "p.toml").write_text('dataset = "digits"\nout = "data/x"\nsplit_seed = 3\n')
    return ["prepare", "--config", "p.toml"]


def _bad_tracking_uri(w: Path) -> list[str]:
    return ["--tracking-uri", "nosuchscheme://x", *tiny_synthetic_args("data/x")]


CASES: dict[str, tuple[Setup, str]] = {
    "missing source": (_missing_source, "source nowhere not found"),
    "wrong shape": (_wrong_shape, "dev_ims.npy: expected a 2-D or 3-D array, got shape [3, 2, 2, 2]"),
    "wrong dtype": (_wrong_dtype, "dev_ims.npy: expected floating-point values, got dtype int32"),
    "caption count": (_caption_count, "test_ims.npy: 4 images but 18 captions"),
    "nan": (_nan, "train_ims.npy: contains NaN or Inf (first at row 5)"),
    "inf": (_inf, "dev_texts: contains NaN or Inf (first at row 0)"),
    "empty split": (_empty_split, "dev_ims.npy: the array is empty"),
    "non-utf8 captions": (_non_utf8, "train_caps.txt: line 41 is not valid UTF-8"),
    "empty caption": (_empty_caption, "dev_caps.txt: line 5 is an empty caption"),
    "missing captions": (_missing_captions, "dev_caps.txt: missing"),
    "corrupt npy": (_corrupt_npy, "train_ims.npy: not a readable .npy array"),
    "labels length": (_labels_mismatch, "test_labels: 5 labels for 6 feature rows"),
    "labels dtype": (_labels_not_integer, "train_labels: expected a 1-D integer array"),
    "texts per image": (_texts_not_multiple, "train_texts: 13 rows is not a multiple of the 12 images"),
    "output exists": (_output_exists, "already exists: pass --force"),
    "unwritable output": (_unwritable_output, "cannot create output folder data"),
    "unknown kind": (_unknown_kind, "prepare.dataset: 'imagenet' is not one of synthetic, digits"),
    "unknown config key": (_unknown_config_key, "prepare.split_seed: unknown key"),
    "bad tracking uri": (_bad_tracking_uri, "cannot use tracking store nosuchscheme://x"),
}


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.startswith("mlflow.db")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_no_leftovers(gssf: Gssf, workdir: Path, case: str) -> None:
    setup, expected = CASES[case]
    args = setup(workdir)
    before = _snapshot(workdir)
    result = gssf(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gssf: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    leftovers = _snapshot(workdir) - before
    assert not {p for p in leftovers if not p.startswith("mlruns")}, leftovers


def test_debug_shows_the_traceback(gssf: Gssf, workdir: Path) -> None:
    result = gssf("--debug", "prepare", "--dataset", "imagenet", "--out", "data/x")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "UserInputError"
