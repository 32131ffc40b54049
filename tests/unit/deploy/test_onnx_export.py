"""The ONNX exporter's recipe: example inputs that keep every axis dynamic, checked by ONNX Runtime at a second
size (the bundle's parity gate and ``--check`` are exercised end to end in ``tests/unit/stages/test_export.py``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from gssf_cli.deploy.onnx_export import export_example
from gssf_cli.modeling.encoders import FeatureEncoder, ImageEncoder, TextEncoder
from tests.unit.modeling.test_encoders import F_IN, VOCAB, WORD, D, random_tokens, randomise_attention


def test_export_example_rejects_sizes_that_specialise() -> None:
    with pytest.raises(ValueError, match="pairwise different"):
        export_example(ImageEncoder(F_IN, D), batch=5, regions=5)
    with pytest.raises(ValueError, match=">= 2"):
        export_example(FeatureEncoder(F_IN, D), batch=1)


def test_onnx_export_keeps_batch_and_length_dynamic(tmp_path: Path) -> None:
    """Dynamo export with default ``optimize``: symbolic input axes, and ONNX Runtime matches PyTorch at two
    (batch, length) sizes, neither the example's. Two text towers are exported back to back: without
    :func:`clear_rnn_dispatch_cache` the second export freezes the length axis (an export of a GRU-free model in
    between happens to clear the cache, so the order matters)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    towers: list[tuple[str, nn.Module]] = [
        ("text", TextEncoder(VOCAB, D, WORD, 2, "attention")),
        ("text_again", TextEncoder(VOCAB, D, WORD, 1, "max")),
        ("image", ImageEncoder(F_IN, D, "attention", mlp=True)),
    ]
    for name, tower in towers:
        tower.eval()
        randomise_attention(tower)
        ex = export_example(tower)
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(tower, ex.args, verbose=False, **ex.export_kwargs())
        assert prog is not None
        prog.save(str(path))
        assert not list(tmp_path.glob("*.data"))

        graph = onnx.load(str(path)).graph
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        is_text = isinstance(tower, TextEncoder)
        if is_text:
            assert dims == {"tokens": ["batch", "length"], "lengths": ["batch"]}
            assert "GRU" in {node.op_type for node in graph.node}
        else:
            assert dims == {"features": ["batch", "regions", F_IN]}
        assert [o.name for o in graph.output] == ["embeddings"]

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch, length in [(2, 4), (6, 13)]:
            if is_text:
                inputs: tuple[Tensor, ...] = random_tokens(batch, length, seed=batch)
            else:
                inputs = (torch.randn(batch, length, F_IN),)
            with torch.no_grad():
                expected = tower(*inputs).numpy()
            got = session.run(None, {n: t.numpy() for n, t in zip(ex.input_names, inputs, strict=True)})[0]
            assert got.shape == (batch, D)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_onnx_export_of_head_only_towers_matches_torch(tmp_path: Path) -> None:
    """A head-only tower without parameters (the L2 norm alone) exports with a dynamic batch axis and matches
    PyTorch at two batch sizes; over a frozen caption tower, whose forward names its inputs differently, the
    example keys the dynamic shapes by those names. (Adapters over features and over frozen MLP towers export
    through the whole bundle gate in ``tests/behaviour/test_head_only.py``; MLP feature towers in
    ``tests/unit/stages/test_export.py``, features and digits kinds.)"""
    ort = pytest.importorskip("onnxruntime")
    from gssf_cli.modeling.encoders import HeadOnlyTower

    frozen_text = HeadOnlyTower(D, D, adapter=True, tower=TextEncoder(VOCAB, D, WORD, 1, "mean"))
    ex = export_example(frozen_text)
    assert ex.input_names == ["tokens", "lengths"] and list(ex.dynamic_shapes) == ["x", "lengths"]
    assert set(ex.dynamic_shapes["x"]) == {0, 1}

    tower = HeadOnlyTower(F_IN, F_IN, adapter=False).eval()
    ex = export_example(tower)
    path = tmp_path / "identity.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(tower, ex.args, verbose=False, **ex.export_kwargs())
    assert prog is not None
    prog.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 6):
        x = torch.randn(batch, F_IN)
        with torch.no_grad():
            expected = tower(x).numpy()
        np.testing.assert_allclose(session.run(None, {"features": x.numpy()})[0], expected, atol=1e-6, rtol=1e-5)
