"""Name -> consensus method registry and the one entry point."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pandas as pd

from cellspot.consensus.types import ConsensusResult, UnknownMethodError, prepare_clicks

log = logging.getLogger(__name__)

ConsensusMethod = Callable[..., ConsensusResult]
METHODS: dict[str, ConsensusMethod] = {}
DEFAULT_METHOD = "cluster_em"


def register(name: str) -> Callable[[ConsensusMethod], ConsensusMethod]:
    def deco(fn: ConsensusMethod) -> ConsensusMethod:
        METHODS[name] = fn
        return fn

    return deco


def run_consensus(
    clicks: pd.DataFrame,
    method: str = DEFAULT_METHOD,
    *,
    runs: pd.DataFrame | None = None,
    gold: pd.DataFrame | None = None,
    cell_radius: float | None = None,
    validated: bool = False,
    **params: object,
) -> ConsensusResult:
    """Run consensus ``method`` over ``clicks`` (see :mod:`cellspot.consensus`).

    ``cell_radius`` (pixels) is an optional hint; methods estimate the scale otherwise.
    ``validated=True`` skips :func:`prepare_clicks` for a table it already returned.
    Raises :class:`UnknownMethodError` listing the valid names.
    """
    fn = get_method(method)
    prepared = clicks if validated else prepare_clicks(clicks)
    log.info("consensus %s on %d clicks", method, len(prepared))
    result = fn(prepared, runs=runs, gold=gold, cell_radius=cell_radius, **params)
    result.params = {"method": method, **result.params}
    return result


def get_method(name: str) -> ConsensusMethod:
    """The method registered as ``name``; :class:`UnknownMethodError` lists the valid names."""
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown consensus method {name!r}; valid: {', '.join(sorted(METHODS))}"
        ) from None


def _load_builtin_methods() -> None:
    # Imported here (not at module import) so the registry module has no side effects.
    from cellspot.consensus import cluster_em, dbscan_vote, seed_r35  # noqa: F401
