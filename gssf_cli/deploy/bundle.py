"""ONNX bundles at deployment time: open, verify and run an exported bundle with ONNX Runtime — no torch.

The only module that imports ``onnx`` and ``onnxruntime`` (lazily: building and tracking a model never pays for
them), and one that never imports torch, so that serving a bundle (:class:`BundleModel`, what
``mlflow.pyfunc.load_model`` gives for a registered export) and ``gssf index`` / ``gssf search`` run on a lean
install (``pip install "gssf[search]"``: onnxruntime, numpy, faiss). Writing a bundle from a trained model —
the torch side, the exporter and the parity gate — is :mod:`gssf_cli.deploy.onnx_export`.

The bundle (``exports/NAME/``) holds one graph per tower — ``image_encoder.onnx`` and ``text_encoder.onnx`` (or
``encoder.onnx`` for label-based data) — and ``metric_head.onnx``, which maps image (query-side) embeddings
through W ⊙ U so that ``scores = head(images) @ texts.T``: GSSF becomes plain inner-product search.

Bundle contract (docs/architecture.md): a bundle whose gate failed is never left at the requested path — it is kept for
inspection as ``<out>.failed`` (:func:`failed_path`) and an existing bundle at ``<out>`` stays untouched;
``manifest.json`` records the sha256 and size of every file the bundle needs (``files``: the graphs and
``vocab.json``), and :func:`verify_bundle` refuses any path that is absolute, climbs out with ``..``, is a
symlink or resolves outside the folder, an incomplete set of graphs (:data:`GRAPHS`, shared with the exporter),
a changed file, or a bundle whose gate failed. A bundle's identity is the sha256 of its manifest
(:func:`manifest_digest`): the manifest checksums every other file, so equal digests mean equal bundles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from gssf_cli.core.cores import free_cores
from gssf_cli.core.errors import UserInputError, first_line
from gssf_cli.core.files import MANIFEST, manifest_digest, matches_entry, sha256_file
from gssf_cli.core.limits import token_block_shape
from gssf_cli.deploy.serving import Layout, Served

BUNDLE_FORMAT = 3
"""3: ``family`` — ``embedding`` or ``interaction`` (a token-level model: towers that also give tokens, and a scorer
graph), with the interaction's settings; 2: a ``files`` section checksums every file the bundle needs (1 covered
the graphs only)."""
READABLE_FORMATS = (2, 3)
"""Formats :func:`verify_bundle` reads: a format-2 bundle is an embedding bundle."""
FAILED_SUFFIX = ".failed"
GRAPHS: dict[str, tuple[str, ...]] = {
    "cross_modal": ("image_encoder", "text_encoder", "metric_head"),
    "labels": ("encoder", "metric_head"),
}
"""The graphs an embedding bundle holds, per dataset task: what the exporter writes and what :func:`verify_bundle`
expects."""
INTERACTION_GRAPHS = ("image_encoder", "text_encoder", "metric_head", "scorer")
"""The graphs an interaction bundle holds (cross-modal only): towers whose second output is the token set
(``regions``: unit regions ``[N, R, D]``; ``words``: unit words ``[M, L, D]``, zero at padding), the metric head (the learned
token similarity as a transform of the image side) and ``scorer`` (regions, words, lengths → ``[N, M]``)."""
FAMILIES = ("embedding", "interaction")
REQUIRED_KEYS = ("source_run_id", "task", "graphs", "files", "parity")


def bundle_graphs(task: str, family: str) -> tuple[str, ...] | None:
    """The graphs a bundle of ``task`` and ``family`` holds (None: no such bundle)."""
    if family == "interaction":
        return INTERACTION_GRAPHS if task == "cross_modal" else None
    return GRAPHS.get(task)


def bundle_family(manifest: dict[str, Any]) -> str:
    """``embedding`` or ``interaction``; a format-2 manifest has no ``family`` and is an embedding bundle."""
    return str(manifest.get("family", "embedding"))


def failed_path(out: Path) -> Path:
    """Where a bundle whose parity gate failed is kept for inspection: ``<out>.failed``, next to ``out``."""
    out = out.expanduser()
    if not out.name:
        out = out.resolve()
    return out.with_name(out.name + FAILED_SUFFIX)


def gate_passed(parity: Any) -> bool:
    """The parity gate's verdict from the report itself: every graph and the retrieval check passed."""
    try:
        return all(g["passed"] is True for g in parity["graphs"].values()) and parity["retrieval"]["passed"] is True
    except (AttributeError, KeyError, TypeError):
        return False


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for every file in a bundle folder except its manifest."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.name != MANIFEST
    }


def open_session(path: Path) -> Any:
    """An ONNX Runtime CPU session on one graph, with as many threads as ``OMP_NUM_THREADS`` allows (Ray sets it
    per trial; ONNX Runtime does not read it), else as the cores no other process is busy on
    (:func:`~gssf_cli.core.cores.free_cores`: a pool thread waiting for a core that another process holds stalls
    every operator)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or free_cores()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _describe_value(value: Any) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}


def check_graph(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``onnx.checker`` (full check) on one graph; its inputs and outputs as ``{"name", "dtype", "shape"}`` (a
    dynamic axis is its name, e.g. ``"batch"``)."""
    import onnx

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    return [_describe_value(v) for v in graph.graph.input], [_describe_value(v) for v in graph.graph.output]


def runtime_versions() -> dict[str, str]:
    """The onnx and onnxruntime versions, for a manifest."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def load_graph(path: Path) -> Any:
    """An ONNX graph as an ``onnx.ModelProto`` (what MLflow logs as a model)."""
    import onnx

    return onnx.load(str(path))


def verify_bundle(folder: Path, *, full_check: bool = True) -> dict[str, Any]:
    """Re-check an existing bundle before deploying it: manifest, gate, paths, checksums, ``onnx.checker``, ORT.

    ``full_check=False`` skips ``onnx.checker`` (ONNX Runtime still loads every graph): what a lean install
    without the ``onnx`` package can check, and what serving and search do before they load a bundle.

    Every refusal is a one-line :class:`UserInputError` naming the file (or the bundle): a manifest that is
    not a JSON object or lacks required keys; a bundle whose parity gate failed; an incomplete set of graphs
    (:data:`GRAPHS`); any path that is absolute, contains ``..``, is a symlink or resolves outside the folder;
    a file the manifest does not checksum, or one that is missing, changed or truncated; an invalid graph.
    """
    manifest = _read_manifest(folder)
    manifest_path = folder / MANIFEST
    if manifest["parity"].get("passed") is not True or not gate_passed(manifest["parity"]):
        raise UserInputError(
            f"{folder}: its parity gate failed (manifest.json records parity outside tolerance); not deployable"
        )
    task, graphs, files = manifest["task"], manifest["graphs"], manifest["files"]
    _check_graph_set(manifest_path, task, bundle_family(manifest), graphs)
    needed = {info["file"]: f"graph {name}" for name, info in graphs.items()}
    vocab = _vocab_file(manifest)
    if vocab is not None:
        needed[vocab] = "the vocabulary"
    elif any(isinstance(i, dict) and i.get("name") == "tokens" for g in graphs.values() for i in g.get("inputs", [])):
        raise UserInputError(f"{manifest_path}: the text encoder takes tokens but the manifest records no vocab.json")
    root = folder.resolve()
    paths = {name: _inside(folder, root, name) for name in dict.fromkeys([*needed, *files])}
    for name, what in needed.items():
        if name not in files:
            raise UserInputError(f"{paths[name]}: {what} is not checksummed in manifest.json; export again")
    digests = _checked_digests(paths, files)
    for info in graphs.values():
        path = paths[info["file"]]
        if info["sha256"] != digests[info["file"]]:
            raise UserInputError(
                f"{path}: checksum mismatch with manifest.json (file changed or truncated); export again"
            )
        try:
            if full_check:
                check_graph(path)
            open_session(path)
        except Exception as exc:
            raise UserInputError(f"{path}: not a valid ONNX graph ({first_line(exc)[:200]})") from None
    return {
        "path": str(folder),
        "task": task,
        "family": bundle_family(manifest),
        "bundle_format": manifest["bundle_format"],
        "graphs": sorted(graphs),
        "files": sorted(files),
        "source_run_id": manifest.get("source_run_id"),
        "digest": manifest_digest(folder),
        "valid": True,
    }


def _check_graph_set(manifest_path: Path, task: str, family: str, graphs: dict[str, Any]) -> None:
    """The graphs a ``task`` bundle of ``family`` holds (:func:`bundle_graphs`), no more and no fewer."""
    if task not in GRAPHS:
        raise UserInputError(f"{manifest_path}: unknown task {task!r} (expected one of {', '.join(GRAPHS)})")
    expected = bundle_graphs(task, family)
    if expected is None:
        raise UserInputError(f"{manifest_path}: no {family} bundle exists for {task} data; export again")
    missing = [name for name in expected if name not in graphs]
    extra = sorted(set(graphs) - set(expected))
    if missing or extra:
        what = (
            f"incomplete bundle, missing graph(s) {', '.join(missing)}"
            if missing
            else (f"unexpected graph(s) {', '.join(extra)}")
        )
        raise UserInputError(
            f"{manifest_path}: {what} (a {task} {family} bundle holds {', '.join(expected)}); export again"
        )


def _checked_digests(paths: dict[str, Path], files: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest checksums, present and unchanged (size, then sha256): ``{name: sha256}``."""
    digests: dict[str, str] = {}
    for name, entry in files.items():
        path = paths[name]
        if not path.is_file():
            raise UserInputError(f"{path}: missing from the bundle; export again")
        if not matches_entry(path, entry):
            raise UserInputError(
                f"{path}: checksum mismatch with manifest.json (file changed or truncated); export again"
            )
        digests[name] = str(entry["sha256"])
    return digests


def _read_manifest(folder: Path) -> dict[str, Any]:
    """A bundle's manifest, checked for shape (not yet for content): one line naming it if it is not usable."""
    path = folder / MANIFEST
    if path.is_symlink():
        raise UserInputError(f"{path}: a symlink; a bundle's files must be plain files inside it")
    if not path.is_file():
        raise UserInputError(f"{folder}: no manifest.json, not a gssf ONNX bundle (run `gssf export --onnx`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserInputError(f"{path}: unreadable bundle manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise UserInputError(f"{path}: not a bundle manifest (expected a JSON object)")
    if "bundle_format" in manifest and manifest["bundle_format"] not in READABLE_FORMATS:
        raise UserInputError(
            f"{path}: bundle format {manifest['bundle_format']!r}, this gssf checks formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; export again"
        )
    missing = [key for key in ("bundle_format", *REQUIRED_KEYS) if key not in manifest]
    if missing:
        raise UserInputError(f"{path}: incomplete bundle manifest (no {', '.join(missing)}); export again")
    graphs, files = manifest["graphs"], manifest["files"]
    well_formed = (
        isinstance(graphs, dict)
        and all(isinstance(g, dict) and isinstance(g.get("file"), str) and isinstance(g.get("sha256"), str)
                for g in graphs.values())
        and isinstance(files, dict)
        and all(isinstance(f, dict) and isinstance(f.get("sha256"), str) and type(f.get("bytes")) is int
                for f in files.values())
        and isinstance(manifest["parity"], dict)
        and isinstance(manifest["task"], str)
    )  # fmt: skip
    if not well_formed:
        raise UserInputError(f"{path}: malformed bundle manifest (graphs, files, parity or task); export again")
    family = manifest.get("family", "embedding")
    if family not in FAMILIES:
        raise UserInputError(f"{path}: unknown bundle family {family!r} (expected one of {', '.join(FAMILIES)})")
    if "family" in manifest and manifest["bundle_format"] < 3:
        raise UserInputError(f"{path}: bundle format {manifest['bundle_format']} has no family (3 has); export again")
    if (family == "interaction") != isinstance(manifest.get("interaction"), dict):
        what = "records no interaction" if family == "interaction" else "records an interaction but no family"
        raise UserInputError(f"{path}: malformed bundle manifest (an {family} bundle that {what}); export again")
    return manifest


def _vocab_file(manifest: dict[str, Any]) -> Any:
    """The vocabulary path the manifest records (``preprocessing.text.vocab``), or None."""
    preprocessing = manifest.get("preprocessing")
    text = preprocessing.get("text") if isinstance(preprocessing, dict) else None
    return text.get("vocab") if isinstance(text, dict) else None


def _inside(folder: Path, root: Path, name: Any) -> Path:
    """``folder / name`` for a path recorded in the manifest, refused unless it is relative, free of ``..``, no
    symlink (nor under one), and resolves inside ``root`` (the resolved bundle folder)."""
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(f"{folder / MANIFEST}: a file path {name!r} that names no file in the bundle")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise UserInputError(f"{name}: an absolute path in {folder / MANIFEST}; a bundle's files lie inside it")
    if ".." in PureWindowsPath(name).parts:
        raise UserInputError(f"{folder / name}: the manifest path climbs out of the bundle with '..'; refusing it")
    path = folder / name
    relative = Path(name)
    for sub in (relative, *relative.parents[:-1]):
        if (folder / sub).is_symlink():
            raise UserInputError(f"{folder / sub}: a symlink; a bundle's files must be plain files inside it")
    if not path.resolve().is_relative_to(root):
        raise UserInputError(f"{path}: resolves outside the bundle folder {folder}; refusing it")
    return path


class BundleModel(Served):
    """A verified bundle on ONNX Runtime (no torch): behind :func:`gssf_cli.deploy.serving.predict` (what
    ``mlflow.pyfunc.load_model`` gives for a registered export) and behind ``gssf index`` / ``gssf search``.

    ``digest`` is the bundle's identity (:func:`manifest_digest`), ``dim`` its embedding size D; ``image_input``
    and ``text_input`` are the per-item input shapes of the towers (``[F]``, ``["regions", F]``, or ``tokens``).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        from gssf_cli.data.text import Vocabulary

        self.folder = folder
        self.manifest = manifest
        self.task: str = manifest["task"]
        self.family = bundle_family(manifest)
        self.interaction: dict[str, Any] | None = manifest.get("interaction")
        self.digest = manifest_digest(folder)
        self.sessions = {name: open_session(folder / info["file"]) for name, info in manifest["graphs"].items()}
        vocab = _vocab_file(manifest)
        self.vocab = Vocabulary.load(folder / vocab) if vocab else None

    @classmethod
    def load(cls, folder: Path | str) -> BundleModel:
        """Open a bundle after :func:`verify_bundle` (gate, paths, checksums; ONNX Runtime loads every graph)
        accepted it."""
        folder = Path(folder)
        verify_bundle(folder, full_check=False)
        return cls(folder, _read_manifest(folder))

    @property
    def image_tower(self) -> str:
        return "encoder" if self.task == "labels" else "image_encoder"

    @property
    def text_tower(self) -> str:
        return "encoder" if self.task == "labels" else "text_encoder"

    @property
    def dim(self) -> int:
        return int(self.sessions["metric_head"].get_inputs()[0].shape[1])

    @property
    def layout(self) -> Layout:
        """What serving checks requests against: the trained dataset's modalities, which the manifest records
        (``preprocessing.modalities``; the graphs leave the region count dynamic), and D."""
        preprocessing = self.manifest.get("preprocessing")
        modalities = preprocessing.get("modalities") if isinstance(preprocessing, dict) else None
        if not isinstance(modalities, dict):
            raise UserInputError(
                f"{self.folder / MANIFEST}: records no preprocessing.modalities (the input layout); export again"
            )
        return Layout.of(self.task, modalities, self.dim)

    def input_shape(self, tower: str) -> list[Any] | str:
        """One item's input shape for ``tower``: ``[F]``, ``["regions", F]`` (an axis name when dynamic), or
        ``"tokens"`` for a caption encoder."""
        inputs = self.sessions[tower].get_inputs()
        if inputs[0].name == "tokens":
            return "tokens"
        return list(inputs[0].shape[1:])

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``[N, ...]`` float32 → ``[N, D]`` L2-normalised embeddings."""
        feed = {"features": np.ascontiguousarray(images, dtype=np.float32)}
        return np.asarray(self.sessions[self.image_tower].run(None, feed)[0])

    def encode_texts(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        """``M`` captions (tokenised with the bundle's vocabulary and rule) or ``[M, F]`` text features → ``[M, D]``."""
        if self.task == "labels" or isinstance(texts, np.ndarray) or self.vocab is None:
            feed = {"features": np.ascontiguousarray(texts, dtype=np.float32)}
        else:
            tokens, lengths = self.vocab.batch(list(texts))
            feed = {"tokens": tokens, "lengths": lengths}
        return np.asarray(self.sessions[self.text_tower].run(None, feed)[0])

    def transform(self, image_embeddings: np.ndarray) -> np.ndarray:
        """``metric_head``: ``[N, D]`` image embeddings → ``[N, D]`` vectors whose inner product with a text
        embedding is the learned score (not unit norm)."""
        feed = {"embeddings": np.ascontiguousarray(image_embeddings, dtype=np.float32)}
        return np.asarray(self.sessions["metric_head"].run(None, feed)[0])

    def scores(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """``metric_head(images) @ texts.T``: the learned similarity as an inner product, ``[N, M]``."""
        return np.asarray(self.transform(image_embeddings) @ np.asarray(text_embeddings, dtype=np.float32).T)

    def encode_image_tokens(self, images: np.ndarray) -> np.ndarray:
        """Interaction bundle: ``[N, R, F]`` (or ``[N, F]``: one region) → unit regions ``[N, R, D]``."""
        feed = {"features": np.ascontiguousarray(images, dtype=np.float32)}
        return np.asarray(self.sessions["image_encoder"].run(["regions"], feed)[0])

    def encode_text_tokens(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Interaction bundle: ``M`` captions → unit words ``[M, L, D]`` (zero at padding) and ``lengths [M]``."""
        assert self.vocab is not None
        tokens, lengths = self.vocab.batch(list(captions))
        words = self.sessions["text_encoder"].run(["words"], {"tokens": tokens, "lengths": lengths})[0]
        return np.asarray(words), lengths

    def pair_scores(self, regions: np.ndarray, words: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Interaction bundle: ``[N, M]`` pair scores of unit regions ``[N, R, D]`` against unit words ``[M, L, D]``
        with ``lengths [M]``, by the ``scorer`` graph in blocks (:func:`score_token_sets`)."""
        return score_token_sets(self.sessions["scorer"], regions, words, lengths)

    def input_scores(self, images: np.ndarray, texts: Sequence[str] | np.ndarray) -> np.ndarray | None:
        """An interaction bundle's pair scores from the inputs (its pooled embeddings cannot give them); None for
        an embedding bundle, whose :meth:`scores` of the embeddings is the answer."""
        if self.family != "interaction":
            return None
        return self.pair_scores(self.encode_image_tokens(images), *self.encode_text_tokens(list(texts)))


def score_token_sets(scorer: Any, regions: np.ndarray, words: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[N, M]`` from an interaction ``scorer`` session: unit regions ``[N, R, D]``, unit words ``[M, L, D]``,
    ``lengths [M]``, scored in blocks of images × captions within the token-pair budget
    (:func:`gssf_cli.core.limits.token_block_shape`, the blocks torch scores in), so memory stays bounded."""
    regions = np.ascontiguousarray(regions, dtype=np.float32)
    words = np.ascontiguousarray(words, dtype=np.float32)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    (n, r, _), (m, length, _) = regions.shape, words.shape
    out = np.empty((n, m), dtype=np.float32)
    if n == 0 or m == 0:
        return out
    images_per_block, captions_per_block = token_block_shape(n, r, m, length)
    for i in range(0, n, images_per_block):
        for t in range(0, m, captions_per_block):
            feed = {"regions": regions[i : i + images_per_block], "words": words[t : t + captions_per_block],
                    "lengths": lengths[t : t + captions_per_block]}  # fmt: skip
            out[i : i + images_per_block, t : t + captions_per_block] = scorer.run(None, feed)[0]
    return out
