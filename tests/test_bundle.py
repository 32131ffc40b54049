"""The ONNX exporter's recipe: example inputs that keep every axis dynamic, checked by ONNX Runtime at a second
size (the bundle's parity gate and ``--check`` are exercised end to end in ``tests/stages/test_export.py``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from gssf_cli.bundle import export_example
from gssf_cli.encoders import FeatureEncoder, ImageEncoder, TextEncoder
from tests.test_encoders import F_IN, VOCAB, WORD, D, random_tokens, randomise_attention


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
