"""Pruning: the criteria and reset strategies (``criteria``) and one module per method.

``from sparse_robust import pruning; pruning.magnitude_prune(...)`` keeps working: the criteria's
public names are re-exported here. The methods are submodules (``pruning.hydra``,
``pruning.inheritance``), imported by name where they are used.
"""

from sparse_robust.pruning.criteria import (  # noqa: F401  (re-exported)
    CRITERIA,
    DEFAULT_RATE_KEY,
    GRANULARITIES,
    RESET_SOURCES,
    RESET_STRATEGIES,
    SCOPES,
    Rates,
    check_granularity,
    check_rate,
    layer_rates,
    magnitude_prune,
    magnitude_scores,
    mask_as_params,
    prune,
    prune_by,
    random_prune,
    random_scores,
    reset,
    weights_remaining_schedule,
)
