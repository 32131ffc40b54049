"""Checkpoints that never unpickle: tensors in safetensors, everything else in JSON, written atomically.

A run folder (``<runs_dir>/<run id>/``) holds two checkpoint folders: :data:`LAST` (the newest epoch, with
optimizer and RNG state, to resume from) and :data:`BEST` (the best validation epoch, weights only, what
evaluation and export use). A checkpoint folder holds ``model.safetensors`` (weights), ``optimizer.safetensors``
(AdamW moments and step counts), ``rng.safetensors`` (torch RNG states) and ``state.json`` (epochs done, best
epoch and metric, optimizer hyper-parameters, config, dataset hash). It is written to a temporary sibling folder
and renamed into place, so a kill at any moment leaves either the previous checkpoint or the new one, never half
of one.

Epoch numbering (the one gssf uses everywhere): epochs count from 1. ``epochs_done`` is the number of completed
epochs, which is also the number of the epoch the checkpoint was saved after; ``best_epoch`` is the number of the
best one (1 = the first epoch). States written before this numbering hold ``epoch`` (the 0-based index of the
saved epoch) and a 0-based ``best_epoch`` instead: every reader here turns them into the current form
(:func:`normalise_state`). New states still hold ``epoch`` (= ``epochs_done - 1``) for readers of that older
form; read ``epochs_done``.

Why :func:`recover`: a save is two renames (the old folder aside, the new one into place), so a kill between
them leaves no ``NAME/`` at all, only ``.NAME.old-PID-TAG`` and a complete ``.NAME.tmp-PID-TAG``. Every reader
and writer first puts the newest complete leftover of a dead process back into place, then removes the other
leftovers of dead processes; a live writer's leftovers are never touched. The run folder also holds
:data:`RUN_CONFIG` (the config and dataset a run started with, written before its first epoch), so a run killed
before its first checkpoint can still be resumed: it starts again at epoch 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gssf_cli.core.config import default_of
from gssf_cli.core.errors import UserInputError, first_line
from gssf_cli.core.files import STALE_AFTER_S, writer_alive, writer_id, writing
from gssf_cli.core.stage_configs import TrainConfig

LAST = "checkpoint"
BEST = "best"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"
RUN_CONFIG = "config.json"
WAIT_FOR_WRITER_S = 2.0
"""How long a reader waits for a live process that is between the two renames of a save."""


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state dict into flat tensors (``state.{param}.{key}``) and JSON param groups."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for param_id, entries in state_dict["state"].items():
        for key, value in entries.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{param_id}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    return {"state": state, "param_groups": groups}


def rng_states(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{index}"] = cuda_state
    if generator is not None:
        states["sampler"] = generator.get_state()
    return states


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda_states = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    if generator is not None and "sampler" in states:
        generator.set_state(states["sampler"])


def save(
    folder: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Write a checkpoint folder atomically (replacing an existing one only once the new one is complete)."""
    with writing(folder, "the checkpoint saved there before stays as it was"):
        _save(folder, model, state, optimizer, generator)


def _save(
    folder: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None,
) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp = folder.with_name(_leftover_name(folder.name, "tmp"))
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL))
        full_state = dict(state)
        if optimizer is not None:
            tensors, groups = optimizer_to_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER))
            full_state["optimizer_param_groups"] = groups
        save_file(rng_states(generator), str(tmp / RNG))
        (tmp / STATE).write_text(json.dumps(full_state, indent=2, default=str) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(_leftover_name(folder.name, "old"))
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load(folder: Path) -> Checkpoint:
    """Read a checkpoint folder (recovering one an interrupted save left aside); anything missing or malformed
    is a one-line user error."""
    recover(folder)
    if not (folder / MODEL).is_file() or not (folder / STATE).is_file():
        raise UserInputError(f"{folder}: no checkpoint here (expected {MODEL} and {STATE})")
    try:
        state = normalise_state(json.loads((folder / STATE).read_text()))
        model = load_file(str(folder / MODEL))
        rng = load_file(str(folder / RNG)) if (folder / RNG).is_file() else {}
        optimizer = None
        if (folder / OPTIMIZER).is_file():
            optimizer = optimizer_from_tensors(
                load_file(str(folder / OPTIMIZER)), state.get("optimizer_param_groups", [])
            )
    except Exception as exc:
        raise UserInputError(f"{folder}: unreadable checkpoint ({first_line(exc)})") from None
    return Checkpoint(model, optimizer, rng, state)


def saved_config(run_id: str, runs_dir: Path | str | None = None) -> dict[str, Any]:
    """The config a run was started with, to resume it: from its last checkpoint, else (a run killed before its
    first checkpoint) from its :data:`RUN_CONFIG`."""
    folder = Path(runs_dir) if runs_dir is not None else default_of(TrainConfig, "runs_dir")
    run_dir = folder / run_id
    started = saved_state(run_dir / LAST) if recover(run_dir / LAST) else read_run_config(run_dir)
    if started is None:
        raise UserInputError(f"run {run_id} has no local checkpoint at {run_dir / LAST}; cannot resume it here")
    config: dict[str, Any] = check_state(started, run_dir, ("config",))["config"]
    return config


def saved_state(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's JSON state alone (epochs done, best epoch and value, config), without loading any
    tensor; an older state comes in the current form (:func:`normalise_state`)."""
    recover(folder)
    state: dict[str, Any] = normalise_state(_read_json(folder / STATE))
    return state


def normalise_state(state: Any) -> Any:
    """A checkpoint state in the current numbering: one written before it (``epoch``: 0-based index of the saved
    epoch, ``best_epoch`` 0-based) gains ``epochs_done`` = ``epoch + 1`` and a 1-based ``best_epoch``. A state
    that already has ``epochs_done`` is kept as it is (one that is not a JSON object too: :func:`check_state` says
    so), except that a config written before feature towers had layers gains ``mlp_layers = 1``
    (:func:`_one_layer_towers`)."""
    if not isinstance(state, dict):
        return state
    state = _one_layer_towers(state)
    if "epochs_done" in state:
        return state
    epoch, best = state.get("epoch"), state.get("best_epoch")
    out = dict(state)
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        out["epochs_done"] = epoch + 1
    if isinstance(best, int) and not isinstance(best, bool):
        out["best_epoch"] = best + 1
    return out


def _one_layer_towers(state: dict[str, Any]) -> dict[str, Any]:
    """A state whose train config (it names its ``data``) predates feature towers with layers (no ``mlp_layers``,
    and no ``encoder``: every newer run writes both, its tower shape resolved) was trained with one-layer towers: it says so, so that its
    model is rebuilt (and resumed) as it was trained rather than with today's defaults."""
    config = state.get("config")
    if not isinstance(config, dict) or "data" not in config or "mlp_layers" in config or "encoder" in config:
        return state
    return {**state, "config": {**config, "mlp_layers": 1}}


def epoch_fields(epochs_done: int) -> dict[str, int]:
    """What a new state says about its place in the run: ``epochs_done``, and the older ``epoch`` index beside it
    (``epochs_done - 1``) for readers that still look for it."""
    return {"epochs_done": epochs_done, "epoch": epochs_done - 1}


def write_run_config(run_dir: Path, config: dict[str, Any], dataset_sha256: str) -> None:
    """Record, atomically, the config and dataset a run starts with (:data:`RUN_CONFIG`), before its first epoch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RUN_CONFIG
    for leftover in _leftovers(target):
        if leftover.stale:
            _remove(leftover.path)
    tmp = target.with_name(_leftover_name(target.name, "tmp"))
    try:
        tmp.write_text(json.dumps({"config": config, "dataset_sha256": dataset_sha256}, indent=2, default=str) + "\n")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """``{"config": ..., "dataset_sha256": ...}`` from :data:`RUN_CONFIG`, or None when the run has none."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    started = _read_json(path)
    if not isinstance(started, dict) or not isinstance(started.get("config"), dict):
        raise UserInputError(f"{path}: not a run config (expected a config and a dataset hash)")
    return started


def recover(folder: Path) -> bool:
    """Put back a checkpoint that a kill between the two renames of :func:`save` left aside, and remove the
    leftovers of dead saves; True when a checkpoint folder is then in place.

    When ``folder`` is missing, the newest complete leftover of a dead process (by the epochs done; a new
    ``.tmp-`` before an ``.old-`` of the same epoch) is renamed into place. Once a folder is in place, the other
    leftovers of dead processes go. A process that is still alive may be between its renames: its leftovers
    stay, and a reader waits a moment for its folder to appear.
    """
    deadline = time.monotonic() + WAIT_FOR_WRITER_S
    leftovers = _leftovers(folder)
    while not folder.is_dir() and any(x.live for x in leftovers) and time.monotonic() < deadline:
        time.sleep(0.05)
        leftovers = _leftovers(folder)
    if not folder.exists():
        _promote(folder, [x for x in leftovers if not x.live])
    if folder.is_dir():
        for leftover in leftovers:
            if leftover.stale and leftover.path.exists():
                _remove(leftover.path)
    return folder.is_dir()


@dataclass(frozen=True)
class _Leftover:
    """A sibling ``.NAME.tmp-…`` or ``.NAME.old-…`` of a checkpoint folder (or of a file written atomically)."""

    path: Path
    kind: str  # "tmp" or "old"
    live: bool  # named by another process that is still running
    stale: bool  # safe to remove: its process is gone (or, named without one, it is over STALE_AFTER_S old)


def _leftover_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{writer_id()}-{uuid.uuid4().hex[:8]}"


def _leftovers(target: Path) -> list[_Leftover]:
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        for kind in ("tmp", "old"):
            prefix = f".{target.name}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            writer, _, tag = entry.name[len(prefix) :].rpartition("-")
            alive = writer_alive(writer)
            if alive is not None and tag:
                found.append(_Leftover(entry, kind, alive, stale=not alive))
            elif not writer and tag:
                found.append(_Leftover(entry, kind, live=False, stale=_older_than(entry, STALE_AFTER_S)))
    return found


def _promote(folder: Path, leftovers: list[_Leftover]) -> None:
    ranked = []
    for leftover in leftovers:
        state = _complete_state(leftover.path)
        if state is not None:
            done = state.get("epochs_done")
            ranked.append((done if isinstance(done, int) else -1, leftover.kind == "tmp", leftover.path))
    if ranked:
        newest = max(ranked, key=lambda r: (r[0], r[1]))[2]
        with contextlib.suppress(OSError):  # another process promoted one first: the caller checks what is in place
            newest.rename(folder)


def _complete_state(folder: Path) -> dict[str, Any] | None:
    """The state of a checkpoint folder whose every file is whole, else None."""
    try:
        state = normalise_state(json.loads((folder / STATE).read_text()))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    needed = [MODEL, RNG] + ([OPTIMIZER] if "optimizer_param_groups" in state else [])
    for name in needed:
        try:
            with safe_open(str(folder / name), "pt") as handle:
                handle.keys()
        except Exception:
            return None
    return state


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _remove(path: Path) -> None:
    """Best effort: a folder this process cannot write to (a shared, read-only runs folder) keeps its leftovers."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{path}: unreadable JSON ({first_line(exc)})") from None


STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "dataset_sha256": (str,),
    "epochs_done": (int,),
    "best_epoch": (int,),
    "best_value": (int, float),
    "last_metrics": (dict,),
}
"""What a checkpoint's ``state.json`` holds for its readers (resume, evaluation, export), with the JSON types
(after :func:`normalise_state`: ``epochs_done`` completed epochs, ``best_epoch`` counted from 1)."""


def check_state(state: Any, path: Path, fields: tuple[str, ...] = tuple(STATE_FIELDS)) -> dict[str, Any]:
    """``state`` (read from ``path``) if it is a JSON object with each of ``fields`` of the right type; else a
    one-line :class:`UserInputError` naming the first field that is missing or wrong, so that a damaged
    ``state.json`` is never a ``KeyError`` deep in a reader."""
    if not isinstance(state, dict):
        raise UserInputError(f"{path}: not a checkpoint state (expected a JSON object, got {type(state).__name__})")
    for name in fields:
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, STATE_FIELDS[name]):
            found = "missing" if name not in state else f"{type(value).__name__} {value!r}"[:60]
            kinds = " or ".join(t.__name__ for t in STATE_FIELDS[name])
            raise UserInputError(f"{path}: not a checkpoint state ({name}: expected {kinds}, got {found})")
    return state
