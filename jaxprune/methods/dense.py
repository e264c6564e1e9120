"""The dense reference: nothing is pruned (the pipeline skips calibration for it)."""

from __future__ import annotations

from jaxprune.methods.base import Layer, Method, Pruned, Request


def prune(layer: Layer, request: Request, options=None) -> Pruned:
    """Keeps every weight."""
    del layer, request, options
    return Pruned({}, {})


METHOD = Method(
    name="dense", prune=prune, description="no pruning (the dense reference)", prunes=False
)
