"""The up-front size checks estimate from settings alone: the estimates must match what building really takes."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

import pytest

from gssf_cli.core.config import from_dict
from gssf_cli.core.errors import UserInputError
from gssf_cli.core.limits import BLOCK_SIMILARITIES, SIMILARITY_NAMES
from gssf_cli.core.stage_configs import PrepareConfig, TrainConfig
from gssf_cli.modeling.encoder_spec import EncoderSpec, build_encoder
from gssf_cli.modeling.model import FLOAT32_BYTES, check_fits_memory, count_parameters
from gssf_cli.modeling.similarity import make_similarity

SPECS = [
    (task, image_kind, text_kind, pooling, mlp, layers)
    for task, image_kind, text_kind, pooling, mlp, layers in itertools.product(
        ("cross_modal", "labels"),
        ("regions", "global", "features"),
        ("captions", "features"),
        ("mean", "max", "attention"),
        (False, True),
        (1, 2),
    )
    if not (task == "labels" and (image_kind == "regions" or text_kind == "features"))
]


def _spec_and_config(
    task: str, image_kind: str, text_kind: str, pooling: str, mlp: bool, layers: int, metric: str, dim: int
) -> tuple[EncoderSpec, TrainConfig]:
    spec = EncoderSpec(
        task=task, image_kind=image_kind, image_dim=5, text_kind=text_kind, text_dim=6, vocab_size=11,
        embed_dim=dim, word_dim=3, pooling=pooling, mlp=mlp, gru_layers=layers,
    )  # fmt: skip
    values = {"data": Path("d"), "metric": metric, "embed_dim": dim, "block_size": 4, "word_dim": 3,
              "pooling": pooling, "mlp": mlp, "gru_layers": layers}  # fmt: skip
    return spec, from_dict(TrainConfig, values, "train")


@pytest.mark.parametrize(("task", "image_kind", "text_kind", "pooling", "mlp", "layers"), SPECS)
def test_the_parameter_count_is_the_built_models(
    task: str, image_kind: str, text_kind: str, pooling: str, mlp: bool, layers: int
) -> None:
    for metric, dim in itertools.product(SIMILARITY_NAMES, (8, 6)):
        block = 4 if metric in BLOCK_SIMILARITIES else None
        if block is not None and dim % block:
            continue
        spec, config = _spec_and_config(task, image_kind, text_kind, pooling, mlp, layers, metric, dim)
        built = sum(p.numel() for p in build_encoder(spec).parameters())
        built += make_similarity(metric, dim, block).num_parameters()
        assert count_parameters(spec, config) == built, (metric, dim)


def test_a_model_larger_than_memory_is_refused_with_the_numbers() -> None:
    spec, config = _spec_and_config("cross_modal", "regions", "captions", "mean", False, 1, "gssf", 8)
    needed = count_parameters(spec, config) * FLOAT32_BYTES
    check_fits_memory(spec, config, available=needed)
    with pytest.raises(UserInputError, match=rf"{needed:,} bytes .* but this machine has {needed - 1:,} bytes"):
        check_fits_memory(spec, config, available=needed - 1)


def test_huge_sizes_are_counted_without_allocating() -> None:
    spec, config = _spec_and_config("cross_modal", "regions", "captions", "mean", False, 1, "dense", 2**24)
    assert count_parameters(spec, config) > 2**48
    with pytest.raises(UserInputError, match="the model would have"):
        check_fits_memory(spec, config)


def test_the_synthetic_memory_estimate_is_close_to_the_real_peak(tmp_path: Path) -> None:
    from gssf_cli.data.synthetic import needed_bytes, write_synthetic

    config = PrepareConfig(dataset="synthetic", out=tmp_path / "x", train_images=3000, dev_images=10, test_images=10)
    memory, disk = needed_bytes(config)
    tracemalloc.start()
    try:
        write_synthetic(config, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.8 * peak <= memory <= 1.5 * peak
    written = sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())
    assert 0.5 * written <= disk <= 2.0 * written
