"""Does a run fit its device? Refused before any work, with the numbers, when it does not.

First for the worst selection the budget allows, then for each selection a run draws. Caching the prefix
is preferred; recomputing it is the fallback that needs less memory.
"""
from __future__ import annotations

from quant.graph import QGraph

from .channels import Selection
from .config import TrainConfig
from .node_perturbation import OUTPUTS


def check_device(graph: QGraph, sample_shape: tuple, cfg: TrainConfig, selection: Selection | None = None,
                 exact_layers: tuple = ()) -> None:
    """Raise a ValueError with the memory breakdown when the run (or its ``selection``) does not fit
    ``cfg.device``; ``exact_layers`` (head first) are the layers whose exact gradients need their inputs."""
    from devices.planner import budget_shape, require_fit, selection_shape
    from devices.profiles import load_profile
    from quant.convert import parse_bits

    profile = load_profile(cfg.device)
    if profile.sram_bytes is None and profile.flash_bytes is None:
        return
    method = "zo" if cfg.method == "zo" else "bp"
    if selection:
        shape = selection_shape(graph, selection, m=cfg.m, batch=cfg.batch_size, momentum=cfg.momentum > 0,
                                bias=cfg.train_bias)
    else:
        shape = budget_shape(graph, sample_shape, cfg.budget_bytes, method=method, m=cfg.m, batch=cfg.batch_size,
                             momentum=cfg.momentum > 0, bits=parse_bits(cfg.bits)[0])
    shape.exact_layers = tuple(exact_layers) if method == "zo" else ()
    shape.node_layers = node_layers(cfg, selection or {}, shape.exact_layers)
    try:
        require_fit(graph, sample_shape, profile, shape, method)
    except ValueError:
        shape.cache_prefix = False
        require_fit(graph, sample_shape, profile, shape, method)


def node_layers(cfg: TrainConfig, selection: Selection, exact_layers: tuple) -> tuple:
    """The selected layers whose outputs node perturbation perturbs (none unless ``zo_params = "outputs"``)."""
    if cfg.method != "zo" or cfg.zo_params != OUTPUTS:
        return ()
    return tuple(name for name in selection if name not in exact_layers)
