"""Shared by the tests of gssf_cli.deploy.search and gssf_cli.deploy.exact_search: galleries shaped like a metric
head's outputs, unit queries, and the slow per-query argsort both are checked against. Not a test module."""

from __future__ import annotations

import numpy as np

DIM = 32


def random_gallery(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """``[n, dim]`` rows with norms spread over [0.5, 2], like a metric head's outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)


def unit_queries(n: int, dim: int = DIM, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def argsort_reference(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow and obvious: score every row per query in float64, sort, pad with -1 / -inf past the gallery."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float64)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for i, q in enumerate(queries):
        s = gallery.astype(np.float64) @ q.astype(np.float64)
        order = np.argsort(-s, kind="stable")[:k]
        rows[i, : len(order)], scores[i, : len(order)] = order, s[order]
    return scores, rows
