"""Datasets: the on-disk format every stage reads, and the kinds ``gssf prepare`` can build.

A dataset folder holds split arrays plus ``manifest.json`` (kind, modalities and shapes, split counts,
source, seed, sha256 of every file, format version). See :mod:`gssf_cli.data.manifest`.
"""
