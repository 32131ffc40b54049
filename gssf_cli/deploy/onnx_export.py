"""Writing ONNX bundles: a trained model as ONNX graphs, gated by ONNX Runtime parity with PyTorch.

The torch side of :mod:`gssf_cli.deploy.bundle` (which holds the bundle's format, its verification and its ONNX Runtime
sessions, and is the only module that imports ``onnx``/``onnxruntime``). A bundle holds one graph per tower —
``image_encoder.onnx`` and ``text_encoder.onnx`` (or ``encoder.onnx`` for label-based data; for a head-only run
over features, ``--encoder identity``, a tower is the L2 norm, with the run's adapter if it has one; over a run's
frozen towers they are included: the manifest's ``encoders`` says which, :func:`encoders_note`) — and
``metric_head.onnx``, which maps image (query-side) embeddings through W ⊙ U so that
``scores = head(images) @ texts.T``. Exporter: torch's dynamo exporter at an explicit opset, single-file
graphs, dynamic batch (and sequence / region) axes, checked by ``onnx.checker`` (full check) and by ONNX Runtime
at several sizes, because the exporter can silently freeze an axis.

Parity (always): on held-out test-split samples at two batch sizes and two caption lengths, every graph's
output must satisfy ``|ort - torch| <= atol + rtol * |torch|``; and retrieval on the whole test split through
ONNX Runtime must rank as PyTorch does — the same top-10 lists and every rank metric, up to float32 ties
(:mod:`gssf_cli.deploy.rank_gate`). An interaction model exports as an interaction bundle
(:mod:`gssf_cli.deploy.interaction_export`: token towers and the scorer graph), gated the same way on its pair
scores. The report goes into ``manifest.json`` and MLflow. A bundle whose gate failed is kept as ``<out>.failed``
(:func:`gssf_cli.deploy.bundle.failed_path`), never at ``<out>``.

ONNX export (torch 2.13, onnxscript 0.7; verified by the tests, which run ONNX Runtime at two batch/length
sizes): :func:`export_example` gives the example inputs and export arguments for a tower, then ::

    ex = export_example(tower)
    prog = torch.onnx.export(tower, ex.args, **ex.export_kwargs())   # dynamo=True, dynamic_shapes, names
    prog.save(path)                                                   # one file, no .onnx.data

Both ``optimize=True`` (the default) and ``optimize=False`` keep every axis dynamic and match PyTorch to ~1e-7
(``optimize=False`` exports faster, ``True`` gives a smaller graph). The GRU becomes a native ONNX ``GRU`` node.
Two traps silently freeze the sequence axis: the graph inputs still *look* symbolic, and ONNX Runtime fails
("invalid expand shape" or "invalid dimensions") only at a length other than the example's. Hence a parity
check must always run at a second size.

- Reading a shape from a GRU output (``expand_as(gru_out)``): the exporter records that output's length as the
  example's constant (pytorch#191855). The text tower takes its shapes from the token tensor
  (:func:`gssf_cli.modeling.encoders._gather_steps`).
- Any earlier trace of a GRU in the same process (a previous ONNX export, a ``torch.export`` such as MLflow's
  "pt2" model logging): the exporter swaps in a ``while_loop`` GRU decomposition that keeps the length dynamic,
  but only by editing ``aten.gru``'s Python kernels without clearing the op's dispatch cache, so after the first
  trace the cached, length-specialising decomposition wins. :func:`clear_rnn_dispatch_cache` clears it;
  :func:`export_example` and ``ExportExample.export_kwargs()`` call it, so the recipe above is safe to repeat.

Smaller traps: example sizes must be > 1 and pairwise different (``torch.export`` specialises size-1 axes and
ties equal ones); the output must not be named ``embedding`` (the exporter gives the ``nn.Embedding`` node's
output that name and ONNX Runtime rejects the duplicate), so it is ``embeddings``; the export emits
FutureWarnings (``_check_is_size``, ``LeafSpec``) that ``-W error`` turns into failures, so export under
``warnings.catch_warnings()``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from gssf_cli.core.errors import UserInputError
from gssf_cli.core.files import MANIFEST
from gssf_cli.core.stage_configs import ExportConfig
from gssf_cli.deploy import interaction_export, rank_gate
from gssf_cli.deploy.bundle import (
    BUNDLE_FORMAT,
    bundle_graphs,
    check_graph,
    failed_path,
    file_checksums,
    gate_passed,
    open_session,
    runtime_versions,
)
from gssf_cli.modeling.encoders import (
    DualEncoder,
    FeatureEncoder,
    HeadOnlyTower,
    ImageEncoder,
    SingleTower,
    TextEncoder,
    encoder_kind,
)
from gssf_cli.modeling.similarity import Similarity

if TYPE_CHECKING:
    from gssf_cli.data.dataset import Dataset, Split
    from gssf_cli.modeling.model import RetrievalModel


class GlobalImageTower(nn.Module):
    """One global feature ``[B, F]`` into an image tower that pools regions ``[B, R, F]`` (R = 1)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.in_dim = int(tower.in_dim)  # type: ignore[arg-type]

    def forward(self, features: Tensor) -> Tensor:
        out: Tensor = self.tower(features.unsqueeze(1))
        return out


class MetricHead(nn.Module):
    """The metric head: image embeddings ``[B, D]`` -> ``[B, D]`` through W ⊙ U (any norm folded in)."""

    def __init__(self, similarity: Similarity) -> None:
        super().__init__()
        self.similarity = similarity

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.similarity.transform(embeddings)


def _towers(model: RetrievalModel, image_kind: str, task: str) -> dict[str, nn.Module]:
    """Graph name -> module with a single-tensor (or tokens+lengths) forward, as users will call it; the names
    are the bundle's graphs (:func:`~gssf_cli.deploy.bundle.bundle_graphs` of ``task`` and the model's family)."""
    family = _family(model)
    if model.interaction is not None:
        tokens = interaction_export.token_towers(model, image_kind)
        named = {name: tokens[name] for name in ("image_encoder", "text_encoder")}
        named["metric_head"] = MetricHead(model.similarity.folded())
        named["scorer"] = tokens["scorer"]
    else:
        towers = export_towers(model.encoder)
        if "features" in towers:
            named = {"encoder": towers["features"]}
        else:
            image = towers["image"]
            if image_kind == "global":
                image = GlobalImageTower(image)
            named = {"image_encoder": image, "text_encoder": towers["text"]}
        named["metric_head"] = MetricHead(model.similarity.folded())
    if tuple(named) != bundle_graphs(task, family):
        raise RuntimeError(
            f"a {task} {family} model exports graphs {', '.join(named)}, not {bundle_graphs(task, family)}"
        )
    for module in named.values():
        module.eval()
    return named


def _example(name: str, module: nn.Module, dim: int) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """Example args, dynamic shapes and input names for one graph."""
    batch = torch.export.Dim("batch")
    if name == "metric_head":
        return (torch.randn(3, dim),), {"embeddings": {0: batch}}, ["embeddings"]
    if name == "scorer":
        return interaction_export.scorer_example(dim)
    if isinstance(module, GlobalImageTower) or (
        isinstance(module, interaction_export.TokenImageTower) and module.global_features
    ):
        return (torch.randn(3, module.in_dim),), {"features": {0: batch}}, ["features"]
    if isinstance(module, (interaction_export.TokenImageTower, interaction_export.TokenTextTower)):
        module = module.tower
    example = export_example(module)
    return example.args, example.dynamic_shapes, example.input_names


OUTPUT_NAMES = {"metric_head": ["transformed"], "scorer": ["scores"]}
"""Graph outputs by graph; a tower's are ``embeddings`` (then ``regions`` / ``words`` for an interaction bundle's)."""


def _family(model: RetrievalModel) -> str:
    """The bundle family a model exports as: ``interaction`` when it scores token sets, else ``embedding``."""
    return "interaction" if model.interaction is not None else "embedding"


def _output_names(name: str, module: nn.Module) -> list[str]:
    if name in OUTPUT_NAMES:
        return OUTPUT_NAMES[name]
    if isinstance(module, interaction_export.TokenImageTower):
        return interaction_export.IMAGE_OUTPUTS
    if isinstance(module, interaction_export.TokenTextTower):
        return interaction_export.TEXT_OUTPUTS
    return ["embeddings"]


def export_graph(name: str, module: nn.Module, dim: int, path: Path, opset: int) -> dict[str, Any]:
    """Export one module to ``path`` (single file) and check it; returns its inputs/outputs description."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    args, shapes, input_names = _example(name, module, dim)
    clear_rnn_dispatch_cache()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=input_names,
            output_names=_output_names(name, module),
            opset_version=opset,
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    inputs, outputs = check_graph(path)
    for value in inputs:
        if not isinstance(value["shape"][0], str):
            raise RuntimeError(f"{name}: the batch axis of input {value['name']} was frozen by the exporter")
        if value["name"] == "tokens" and not isinstance(value["shape"][1], str):
            raise RuntimeError(f"{name}: the sequence axis of tokens was frozen by the exporter")
    return {"file": path.name, "inputs": inputs, "outputs": outputs, "opset": opset}


@dataclass(frozen=True)
class WrittenBundle:
    """Where :func:`write_bundle` left a bundle — ``out``, or :func:`failed_path` when its gate failed — and its
    manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.manifest["parity"]["passed"])


class _GateFailed(Exception):
    """Leaves :func:`staged_folder` without moving the staging folder into ``out``."""


def write_bundle(
    model: RetrievalModel, dataset: Dataset, out: Path, config: ExportConfig, source_run_id: str
) -> WrittenBundle:
    """Export ``model``'s graphs into a staging folder, check parity on ``dataset``'s ``config.split``, and write
    ``manifest.json``. The staging folder becomes ``out`` only if the gate passed; otherwise it becomes
    ``<out>.failed`` (replacing an older one) and whatever was at ``out`` stays as it was."""
    from gssf_cli.core.files import staged_folder

    model.eval()
    if not dataset.has_split(config.split):
        raise UserInputError(f"{dataset.folder} has no {config.split!r} split to check parity on")
    image_kind = dataset.manifest["modalities"].get("image", {}).get("type", "features")
    manifest: dict[str, Any] = {}
    try:
        with staged_folder(out, config.force) as staging:
            manifest = _write_into(staging, model, dataset, image_kind, config, source_run_id)
            if not manifest["parity"]["passed"]:
                _keep_failed(staging, failed_path(out))
                raise _GateFailed
    except _GateFailed:
        return WrittenBundle(failed_path(out), manifest)
    return WrittenBundle(out.expanduser(), manifest)


def _write_into(
    staging: Path, model: RetrievalModel, dataset: Dataset, image_kind: str, config: ExportConfig, source_run_id: str
) -> dict[str, Any]:
    towers = _towers(model, image_kind, dataset.task)
    graphs = {
        name: export_graph(name, module, model.similarity.dim, staging / f"{name}.onnx", config.opset)
        for name, module in towers.items()
    }
    sessions = {name: open_session(staging / info["file"]) for name, info in graphs.items()}
    split = dataset.split(config.split)
    with torch.no_grad():
        parity: dict[str, Any] = {"graphs": _graph_parity(towers, sessions, split, config, model.similarity.dim)}
        if model.interaction is not None:
            scorer = towers["scorer"]
            assert isinstance(scorer, interaction_export.TokenScorer)
            checks = interaction_export.scorer_parity(model, scorer, sessions["scorer"], split, config)
            parity["graphs"]["scorer"] = _merge_checks(checks)
            torch_scores, ort_scores = interaction_export.split_scores(model, sessions, split)
        else:
            torch_scores, ort_scores = _embedding_split_scores(model, sessions, split)
        parity["retrieval"] = rank_gate.rank_parity(split, torch_scores, ort_scores, config.atol, config.rtol)
    parity["passed"] = gate_passed(parity)
    preprocessing = _preprocessing(dataset, staging)
    files = file_checksums(staging)
    for info in graphs.values():
        info["sha256"] = files[info["file"]]["sha256"]
    family = _family(model)
    manifest = {
        "bundle_format": BUNDLE_FORMAT,
        "family": family,
        **({"interaction": model.interaction.settings()} if model.interaction is not None else {}),
        "source_run_id": source_run_id,
        "task": dataset.task,
        "dataset": {"name": dataset.name, "manifest_sha256": dataset.digest},
        "metric": {"name": model.similarity.name, "block_size": model.similarity.block_size},
        "exporter": {"name": "torch.onnx.export(dynamo=True)", "opset": config.opset},
        "versions": _versions(),
        "graphs": graphs,
        "encoders": encoders_note(model),
        "files": files,
        "preprocessing": preprocessing,
        "usage": USAGE[family],
        "parity": parity,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return manifest


USAGE = {
    "embedding": "scores = metric_head(image_embeddings) @ text_embeddings.T",
    "interaction": "scores = scorer(image_encoder(images).tokens, text_encoder(tokens, lengths).tokens, lengths); "
    "metric_head(region) · word is the learned token similarity",
}
"""What a bundle's manifest says its graphs compute, by family."""


ENCODER_NOTES = {
    "trained": "the towers the run trained with its metric head",
    "identity": "a head-only run over features (--encoder identity): no trained towers, so each encoder graph is "
    "the L2 normalisation of the features{adapter}, and the bundle holds just the metric head{and_adapters}; feed "
    "the encoder graphs the kind of features the run trained on (e.g. CLIP image and text embeddings)",
    "frozen": "a head-only run over a trained run's frozen towers (--encoder frozen): the frozen towers are "
    "included in the encoder graphs{adapter}, so the bundle deploys end to end from raw inputs",
}
"""What a bundle's encoder graphs are, by the run's ``--encoder`` (the manifest's ``encoders.note``)."""


def encoders_note(model: RetrievalModel) -> dict[str, Any]:
    """The manifest's ``encoders``: the run's kind of towers (``trained``, ``identity``, ``frozen``), whether it
    has adapters, and a sentence saying what the encoder graphs hold."""
    kind, adapter = encoder_kind(model.encoder)
    note = ENCODER_NOTES[kind].format(
        adapter=", then the run's linear adapter and L2 again" if adapter else "",
        and_adapters=" and the adapters" if adapter else "",
    )
    return {"kind": kind, "adapter": adapter, "note": note}


def _keep_failed(staging: Path, failed: Path) -> None:
    """Move a staged bundle whose gate failed to ``failed``, replacing an older one there."""
    retired = staging.with_name(staging.name + ".old")
    if failed.is_symlink() or failed.is_file():
        failed.unlink()
    elif failed.exists():
        failed.rename(retired)
    staging.rename(failed)
    shutil.rmtree(retired, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _versions() -> dict[str, str]:
    from gssf_cli import __version__

    return {"gssf": __version__, "torch": torch.__version__, **runtime_versions()}


def _preprocessing(dataset: Dataset, bundle: Path) -> dict[str, Any]:
    """What a user must do to inputs before the graphs: the vocabulary and tokenisation rule, or feature shapes."""
    from gssf_cli.data.text import END, PAD, START, TOKENIZER, UNK

    info: dict[str, Any] = {"modalities": dataset.manifest["modalities"]}
    if dataset.vocab is not None:
        shutil.copyfile(dataset.folder / "vocab.json", bundle / "vocab.json")
        info["text"] = {
            "vocab": "vocab.json",
            "tokenizer": TOKENIZER,
            "rule": "lowercase; tokens are runs of letters/digits (an apostrophe suffix stays attached), "
            'i.e. re.findall(r"[^\\W_]+(?:\'[^\\W_]+)?", caption.lower()); ids from vocab.json words '
            "(unknown -> <unk>), framed as <start> ... <end>; pad with <pad> to the longest caption; "
            "lengths = number of ids including <start> and <end>",
            "special_ids": {"pad": PAD, "start": START, "end": END, "unk": UNK},
        }
    return info


def _graph_inputs(name: str, split: Split, rows: np.ndarray) -> dict[str, np.ndarray]:
    if name == "text_encoder":
        texts, lengths = split.text_batch(rows)
        if lengths is None:
            return {"features": texts.numpy()}
        return {"tokens": texts.numpy(), "lengths": lengths.numpy()}
    return {"features": split.image_batch(rows).numpy()}


def _graph_parity(
    towers: dict[str, nn.Module], sessions: dict[str, Any], split: Split, config: ExportConfig, dim: int
) -> dict[str, Any]:
    """Each graph against torch at two batch sizes (and, for captions, two padded lengths)."""
    report: dict[str, Any] = {}
    n_images = split.num_images
    small, large = 1, min(config.parity_batch, n_images)
    for name, module in towers.items():
        if name in ("metric_head", "scorer"):
            continue
        checks = []
        if name == "text_encoder":
            order = np.argsort(
                split.captions.lengths if split.captions is not None else np.zeros(split.num_pairs), kind="stable"
            )
            batches = [order[:small], order[-large:], order[: max(2, large // 2)]]
        else:
            batches = [np.arange(small), np.arange(large)]
        for rows in batches:
            inputs = _graph_inputs(name, split, rows)
            out = module(*(torch.from_numpy(v) for v in inputs.values()))
            expected = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
            got = sessions[name].run(None, inputs)
            reports = [
                rank_gate.allclose_report(g, e, config.atol, config.rtol) for g, e in zip(got, expected, strict=True)
            ]
            checks.append({"batch": len(rows), **({"length": int(inputs["tokens"].shape[1])} if "tokens" in inputs else {}),
                           **_merge_checks(reports, keep=False)})  # fmt: skip
        report[name] = _merge_checks(checks)
    head = towers["metric_head"]
    checks = []
    for batch in (small, large):
        embeddings = torch.nn.functional.normalize(
            torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch)), dim=1
        )
        expected = head(embeddings).numpy()
        got = sessions["metric_head"].run(None, {"embeddings": embeddings.numpy()})[0]
        checks.append({"batch": batch, **rank_gate.allclose_report(got, expected, config.atol, config.rtol)})
    report["metric_head"] = _merge_checks(checks)
    return report


def _merge_checks(checks: list[dict[str, Any]], keep: bool = True) -> dict[str, Any]:
    """The worst of several checks (of one graph's sizes, or of one call's outputs), and the checks with ``keep``."""
    return {
        "max_abs_diff": max(c["max_abs_diff"] for c in checks),
        "max_rel_diff": max(c["max_rel_diff"] for c in checks),
        "passed": all(c["passed"] for c in checks),
        **({"checks": checks} if keep else {}),
    }


def _ort_embeddings(sessions: dict[str, Any], name: str, split: Split, count: int, batch: int = 128) -> np.ndarray:
    outs = []
    for start in range(0, count, batch):
        rows = np.arange(start, min(start + batch, count))
        outs.append(sessions[name].run(None, _graph_inputs(name, split, rows))[0])
    return np.concatenate(outs)


def _embedding_split_scores(
    model: RetrievalModel, sessions: dict[str, Any], split: Split
) -> tuple[np.ndarray, np.ndarray]:
    """``(torch scores, ONNX Runtime scores)`` of the whole split: head(images) @ texts.T on both sides."""
    from gssf_cli.modeling.model import embed_split

    torch_images, torch_texts = embed_split(model, split, torch.device("cpu"))
    torch_scores = model.similarity.scores(torch_images, torch_texts).numpy()
    if split.task == "cross_modal":
        ort_images = _ort_embeddings(sessions, "image_encoder", split, split.num_images)
        ort_texts = _ort_embeddings(sessions, "text_encoder", split, split.num_pairs)
    else:
        ort_images = ort_texts = _ort_embeddings(sessions, "encoder", split, split.num_images)
    ort_head = sessions["metric_head"].run(None, {"embeddings": ort_images})[0]
    return torch_scores, ort_head @ ort_texts.T


def parity_metrics(parity: dict[str, Any]) -> dict[str, float]:
    metrics = {f"{name}_max_abs_diff": g["max_abs_diff"] for name, g in parity["graphs"].items()}
    metrics |= {f"{name}_max_rel_diff": g["max_rel_diff"] for name, g in parity["graphs"].items()}
    retrieval = parity["retrieval"]
    metrics |= {"top10_identical": retrieval["top10_identical"], "max_abs_score_diff": retrieval["max_abs_score_diff"]}
    metrics |= {f"onnx_{k}": v for k, v in retrieval["metrics_onnx"].items()}
    return metrics


def export_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules to export as separate ONNX graphs: ``{"image": ..., "text": ...}`` for a dual encoder,
    ``{"features": ...}`` for a single tower, ``{"encoder": model}`` for a bare encoder."""
    if isinstance(model, DualEncoder):
        return {"image": model.image, "text": model.text}
    if isinstance(model, SingleTower):
        return {"features": model.encoder}
    return {"encoder": model}


def clear_rnn_dispatch_cache() -> None:
    """Forget which Python kernel ``aten.gru`` / ``aten.lstm`` resolved to in earlier traces (see the module
    docstring): without this, every ONNX export of a GRU after the first trace in a process freezes the sequence
    axis. Eager execution does not use this cache, so clearing it is harmless."""
    for op in (torch.ops.aten.gru.input, torch.ops.aten.lstm.input):
        cache = getattr(op, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()


@dataclass(frozen=True)
class ExportExample:
    """Example inputs and the matching ``torch.onnx.export`` arguments for one tower (see the module docstring)."""

    args: tuple[Tensor, ...]
    dynamic_shapes: dict[str, dict[int, Any]]
    input_names: list[str]
    output_names: list[str]

    def export_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.onnx.export``; clears the RNN dispatch cache (see the module docstring)
        as a side effect, since this is evaluated right at the export call."""
        clear_rnn_dispatch_cache()
        return {
            "dynamo": True,
            "dynamic_shapes": self.dynamic_shapes,
            "input_names": self.input_names,
            "output_names": self.output_names,
        }


def export_example(tower: nn.Module, batch: int = 3, length: int = 7, regions: int = 5) -> ExportExample:
    """Example inputs with dynamic batch (and sequence length, and region count) for ``torch.onnx.export``.

    The sizes must be > 1 and pairwise different, or ``torch.export`` specialises or ties the axes. Inputs sit
    on the tower's device; token ids are non-zero and the lengths vary, with one full-length row. Also calls
    :func:`clear_rnn_dispatch_cache`, so that the export that follows keeps the sequence axis dynamic.
    Inputs: ``tokens [B, L]`` int64 and ``lengths [B]`` int64 (text), ``features [B, R, F]`` (image) or
    ``features [B, F]`` (feature tower); a head-only tower (:class:`~gssf_cli.modeling.encoders.HeadOnlyTower`) takes its
    frozen tower's inputs, or ``features [B, F]`` (identity); output: ``embeddings [B, D]``.
    """
    if min(batch, length, regions) < 2 or len({batch, length, regions}) < 3:
        raise ValueError("example sizes must be >= 2 and pairwise different to keep the axes dynamic")
    clear_rnn_dispatch_cache()
    param = next(tower.parameters(), None)  # an identity tower without adapter has none
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    batch_dim = torch.export.Dim("batch")
    out = ["embeddings"]
    inner = tower.tower if isinstance(tower, HeadOnlyTower) and tower.tower is not None else tower
    args: tuple[Tensor, ...]
    if isinstance(inner, TextEncoder):
        tokens = torch.randint(1, inner.vocab_size, (batch, length), generator=gen)
        lengths = torch.arange(batch, 0, -1) * length // batch
        args = (tokens.to(device), lengths.to(device))
        shapes = {"tokens": {0: batch_dim, 1: torch.export.Dim("length")}, "lengths": {0: batch_dim}}
    elif isinstance(inner, ImageEncoder):
        args = (torch.randn(batch, regions, inner.in_dim, generator=gen).to(device, dtype),)
        shapes = {"features": {0: batch_dim, 1: torch.export.Dim("regions")}}
    elif isinstance(inner, (FeatureEncoder, HeadOnlyTower)):
        args = (torch.randn(batch, inner.in_dim, generator=gen).to(device, dtype),)
        shapes = {"features": {0: batch_dim}}
    else:
        raise TypeError(f"no export example for {type(tower).__name__}")
    names = list(shapes)
    # torch.export keys dynamic shapes by the names of forward's arguments (a head-only tower's differ).
    arguments = list(inspect.signature(tower.forward).parameters)
    return ExportExample(args, {arguments[i]: shapes[name] for i, name in enumerate(names)}, names, out)
