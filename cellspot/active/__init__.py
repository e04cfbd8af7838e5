"""Active learning: score images by how much labelling them would teach, pick diverse batches.

* :mod:`cellspot.active.strategies` -- the name -> strategy registry and :func:`score_images`
  (pure: numpy/pandas).
* :mod:`cellspot.active.select` -- batch-aware selection and k-center greedy (pure).
* :mod:`cellspot.active.signals` -- the per-image signal table, pure from frames
  (:func:`build_signals`) or read from the store (:func:`image_signals`; SQLAlchemy is
  imported only when the store is read).
"""

from cellspot.active.select import SelectionError, default_features, k_center_greedy, select_batch
from cellspot.active.signals import (
    SIGNAL_COLUMNS,
    NoPredictionsError,
    SignalSources,
    build_signals,
    cell_conflicts,
    image_signals,
    match_table,
)
from cellspot.active.strategies import (
    DEFAULT_STRATEGY,
    DEFAULT_WEIGHTS,
    STRATEGIES,
    MissingSignalError,
    UnknownStrategyError,
    get_strategy,
    list_strategies,
    mutual_information,
    score_images,
)

__all__ = [
    "DEFAULT_STRATEGY", "DEFAULT_WEIGHTS", "SIGNAL_COLUMNS", "STRATEGIES", "MissingSignalError",
    "NoPredictionsError", "SelectionError", "SignalSources", "UnknownStrategyError", "build_signals",
    "cell_conflicts", "default_features", "get_strategy", "image_signals", "k_center_greedy",
    "list_strategies", "match_table", "mutual_information", "score_images", "select_batch",
]
