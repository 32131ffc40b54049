"""``gssf index`` and ``gssf search`` for either family of bundle: the entry points, which pick the kind of index.

An embedding bundle's gallery becomes an index of pooled vectors (:mod:`gssf_cli.deploy.index_folder`); an
interaction bundle's becomes a token index searched by late interaction (:mod:`gssf_cli.deploy.token_index`). Both
check every input before anything is written and share the folder layout, ids, captions and checks.
"""

from __future__ import annotations

from gssf_cli.core.stage_configs import IndexConfig, SearchConfig
from gssf_cli.deploy import index_folder, token_index
from gssf_cli.deploy.index_folder import BuiltIndex, Progress, SearchResult


def build(config: IndexConfig, progress: Progress | None = None) -> BuiltIndex:
    """Build ``config``'s index folder: the bundle's family decides which kind."""
    bundle, gallery, out = index_folder.build_inputs(config)
    if bundle.family == "interaction":
        return token_index.build(config, bundle, gallery, out, progress)
    return index_folder.build(config, bundle, gallery, out, progress)


def run_search(config: SearchConfig) -> SearchResult:
    """Answer ``config``'s queries from its index (checked first, with its bundle: :func:`index_folder.open_index`)."""
    assert config.index is not None
    opened = index_folder.open_index(config.index, config.bundle)
    if opened.bundle.family == "interaction":
        return token_index.run_search(opened, config)
    return index_folder.run_search(opened, config)
