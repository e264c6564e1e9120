"""Pruning methods as plug-ins: one module per method, each with its config section and one entry
point (:class:`jaxprune.methods.base.Method`), found by name in :mod:`jaxprune.methods.registry`.

Built in: ``dense`` (the reference), ``magnitude``, ``wanda``, ``sparsegpt`` and ``softmax`` (the
softmax-aware method). :mod:`jaxprune.methods.stats` holds the calibration statistics they read.
"""
