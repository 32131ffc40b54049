"""Checkpoints that never unpickle: tensors in safetensors, everything else in JSON, written atomically.

A run folder (``<runs_dir>/<run id>/``) holds two checkpoint folders: :data:`LAST` (the newest epoch, with
optimizer and RNG state, to resume from) and :data:`BEST` (the best validation epoch, weights only, what
evaluation and export use). A checkpoint folder holds ``model.safetensors`` (weights), ``optimizer.safetensors`` (AdamW moments and
step counts), ``rng.safetensors`` (torch RNG states) and ``state.json`` (epoch, best metric, optimizer
hyper-parameters, config, dataset hash). It is written to a temporary sibling folder and renamed into
place, so a kill at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gssf_cli.config import TrainConfig, default_of
from gssf_cli.errors import UserInputError

LAST = "checkpoint"
BEST = "best"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STATE = "state.json"


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
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
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load(folder: Path) -> Checkpoint:
    """Read a checkpoint folder; anything missing or malformed is a one-line user error."""
    if not (folder / MODEL).is_file() or not (folder / STATE).is_file():
        raise UserInputError(f"{folder}: no checkpoint here (expected {MODEL} and {STATE})")
    try:
        state = json.loads((folder / STATE).read_text())
        model = load_file(str(folder / MODEL))
        rng = load_file(str(folder / RNG)) if (folder / RNG).is_file() else {}
        optimizer = None
        if (folder / OPTIMIZER).is_file():
            optimizer = optimizer_from_tensors(
                load_file(str(folder / OPTIMIZER)), state.get("optimizer_param_groups", [])
            )
    except Exception as exc:
        raise UserInputError(f"{folder}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    return Checkpoint(model, optimizer, rng, state)


def saved_config(run_id: str, runs_dir: Path | str | None = None) -> dict[str, Any]:
    """The config a run was started with, read from its last checkpoint (to resume it)."""
    folder = Path(runs_dir) if runs_dir is not None else default_of(TrainConfig, "runs_dir")
    state_file = folder / run_id / LAST / STATE
    if not state_file.is_file():
        raise UserInputError(f"run {run_id} has no local checkpoint at {state_file.parent}; cannot resume it here")
    config: dict[str, Any] = json.loads(state_file.read_text())["config"]
    return config


def saved_state(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's JSON state alone (epoch, best value, config), without loading any tensor."""
    state: dict[str, Any] = json.loads((folder / STATE).read_text())
    return state
