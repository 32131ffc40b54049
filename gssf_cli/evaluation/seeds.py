"""Seeds as an axis: a figure made from several seeds is a mean, a spread and a count, never one lucky run.

Why a module of its own: ``gssf train --seeds``, the tune summary, the block-size figure and the experiments
table all aggregate runs that differ only in their seed; they read :func:`spread` and :func:`by_configuration`
here so that every table says the same thing the same way (sample standard deviation, ``n`` beside it).
Standard library only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gssf_cli.core.errors import UserInputError

SEEDS_TAG = "gssf.seeds"
SEED_KEY = "seed"
"""The train setting that names a run's seed: configurations that differ only in it are one configuration."""

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """``mean`` ± ``std`` over ``n`` values; ``std`` is the sample standard deviation (n − 1 in the denominator),
    0 for a single value (no spread can be estimated from one run: the table shows n = 1 beside it)."""

    mean: float
    std: float
    n: int

    def to_json(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "n": self.n}

    def text(self, digits: int = 2) -> str:
        """``mean ± std`` (n shown by the caller's column), or the mean alone for one value."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def spread(values: Iterable[float]) -> Spread:
    """Mean, sample standard deviation and count of ``values`` (finite numbers; at least one)."""
    numbers = [float(v) for v in values]
    if not numbers:
        raise ValueError("spread of no values")
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return Spread(statistics.fmean(numbers), std, len(numbers))


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    """Per metric, the :class:`Spread` over ``runs`` (each a ``{metric: value}``) of every metric all runs have
    with a finite value, in the first run's order."""
    names = [k for k in runs[0] if all(k in run and _finite(run[k]) for run in runs)] if runs else []
    return {name: spread(run[name] for run in runs) for name in names}


def by_configuration(
    items: Sequence[T], values: Callable[[T], Mapping[str, Any]]
) -> list[tuple[dict[str, Any], list[T]]]:
    """Group ``items`` whose settings (``values(item)``) are equal once the seed is left out, in order of first
    appearance: ``[(settings without the seed, [items...]), ...]``."""
    groups: dict[Hashable, tuple[dict[str, Any], list[T]]] = {}
    for item in items:
        settings = {k: v for k, v in values(item).items() if k != SEED_KEY}
        key = tuple(sorted((k, _hashable(v)) for k, v in settings.items()))
        groups.setdefault(key, (settings, []))[1].append(item)
    return list(groups.values())


def check_seeds(seeds: Sequence[int], option: str = "--seeds") -> tuple[int, ...]:
    """Distinct seeds, at least one: a repeated seed would count one run twice in every mean and spread."""
    if not seeds:
        raise UserInputError(f"{option}: give at least one seed, e.g. 0,1,2")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise UserInputError(f"{option}: seed {repeated[0]} is listed twice; every seed is one run")
    return tuple(seeds)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value
