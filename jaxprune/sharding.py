"""The softmax-aware mask solve spread over devices with ``jax.sharding``.

A mesh has two axes. ``"heads"`` splits one layer's key/value groups: a key head and the query
heads that read it live on one device, so a step needs no communication but the sum of the
scalar loss. ``"layers"`` splits a stack of independent layer solves (``layer_inputs: dense``),
which need none at all. The solve's arrays are placed with ``jax.device_put`` and a
``NamedSharding``; the solver's jit-compiled steps follow the shardings of their inputs (XLA's SPMD
partitioner), so the solver's code is the same on one CPU, several CPU devices, a GPU or a TPU
slice. With one device, or when no device count divides the shapes, there is no mesh: nothing is
placed and the solve runs exactly as it does without this module.

``$JAXPRUNE_DEVICES=N`` limits a solve to the first ``N`` devices (``1``: no sharding).
``$JAXPRUNE_DISTRIBUTED=1`` makes the command line call ``jax.distributed.initialize()`` before
anything else touches JAX, as every process of a multi-host pod must (:func:`maybe_initialize`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.errors import DistributedError

LAYERS, HEADS = "layers", "heads"


def maybe_initialize() -> bool:
    """Calls ``jax.distributed.initialize()`` when ``$JAXPRUNE_DISTRIBUTED`` is ``1`` (every
    process of a multi-process run).

    On a cluster JAX finds the coordinator, the process count and this process's index itself
    (SLURM, Open MPI, Kubernetes, Cloud TPU). Elsewhere (several processes on one machine, or
    hosts started by hand) set ``$JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0, read by
    JAX), ``$JAXPRUNE_NUM_PROCESSES`` and ``$JAXPRUNE_PROCESS_ID``. On CPUs the processes'
    collectives go over gloo (JAX's default).

    Returns:
      Whether it was called.

    Raises:
      DistributedError: a process count or index that is not a number, or only one of the
        two.
    """
    if os.environ.get("JAXPRUNE_DISTRIBUTED", "0") in ("", "0"):
        return False
    given = {
        key: os.environ.get(name)
        for key, name in (
            ("num_processes", "JAXPRUNE_NUM_PROCESSES"),
            ("process_id", "JAXPRUNE_PROCESS_ID"),
        )
    }
    if any(v is not None for v in given.values()):
        if not all(v is not None and v.isdigit() for v in given.values()):
            raise DistributedError(
                f"JAXPRUNE_NUM_PROCESSES={given['num_processes']!r} and JAXPRUNE_PROCESS_ID="
                f"{given['process_id']!r}: give both, as whole numbers (the index from 0)."
            )
        jax.distributed.initialize(**{k: int(v) for k, v in given.items()})
    else:
        jax.distributed.initialize()
    return True


def solve_devices() -> list[jax.Device]:
    """The devices a solve may use: ``jax.devices()``, or its first ``$JAXPRUNE_DEVICES``."""
    devices = jax.devices()
    limit = os.environ.get("JAXPRUNE_DEVICES")
    if limit:
        if not limit.isdigit() or int(limit) < 1:
            raise ValueError(f"JAXPRUNE_DEVICES={limit!r}: give a positive number of devices.")
        devices = devices[: int(limit)]
    return devices


def solve_mesh(n_kv_heads: int, n_layers: int = 1, devices=None) -> Mesh | None:
    """A ``("layers", "heads")`` mesh for the solve of ``n_layers`` stacked layers.

    One layer: every device that the key/value groups divide evenly goes to ``"heads"``
    (``gcd(devices, n_kv_heads)``). Several layers: all devices go to ``"layers"`` (no
    communication; the caller pads the stack to a multiple), unless there are fewer layers than
    devices, when ``"heads"`` takes ``gcd(devices, n_kv_heads)`` of them first.

    Args:
      n_kv_heads: key/value heads of a layer.
      n_layers: layers solved together (1: one layer, no layer axis).
      devices: the devices to use (default :func:`solve_devices`).

    Returns:
      The mesh, or ``None`` when it would have one device (the unsharded fast path).
    """
    devices = solve_devices() if devices is None else list(devices)
    n = len(devices)
    heads = math.gcd(n, n_kv_heads) if n_layers < n else 1
    layers = n // heads if n_layers > 1 else 1
    if layers * heads == 1:
        return None
    grid = np.asarray(devices[: layers * heads], dtype=object).reshape(layers, heads)
    return Mesh(grid, (LAYERS, HEADS))


def _spec(kind: str, stacked: bool) -> P:
    # q/k masks and kernels (d, heads*dh): columns by head; the target (h, b, r, n) and the
    # output form's values (h, b, n, dh) and output rows (h, dh, d): by head; the inputs and
    # scalars are replicated over heads.
    per_layer = {"kernel": (None, HEADS), "heads": (HEADS,), "inputs": (), "scalar": ()}[kind]
    return P(*((LAYERS,) if stacked else ()), *per_layer)


def place_qk_solve(mesh: Mesh | None, init, data, *, stacked: bool = False):
    """Places a q/k mask solve's start point and data on ``mesh``.

    Args:
      mesh: from :func:`solve_mesh`; ``None`` returns the arguments unchanged.
      init: masks ``{"q": (d, h*dh), "k": (d, g*dh)}``.
      data: ``(weights, x, target, scale, values, *scalars)``: kernels shaped like ``init``,
        inputs ``(b, n, d)``, dense probabilities ``(h, b, r, n)`` or ``None``, the attention
        scale, the output form's ``(V, O)`` or ``None``, and any further per-layer scalars (such
        as lambda).
      stacked: every array has a leading layer axis (split over ``"layers"``).

    Returns:
      ``(init, data)`` on the mesh.
    """
    if mesh is None:
        return init, data
    weights, x, target, scale, values, *scalars = data

    def put(tree, kind):
        return place(mesh, tree, kind, stacked=stacked)

    placed = (
        put(weights, "kernel"),
        put(x, "inputs"),
        None if target is None else put(target, "heads"),
        put(scale, "scalar"),
        None if values is None else put(values, "heads"),
        *(put(s, "scalar") for s in scalars),
    )
    return put(init, "kernel"), placed


def place(mesh: Mesh | None, tree: Any, kind: str, *, stacked: bool = False) -> Any:
    """Places every array of ``tree`` on ``mesh``, split as ``kind``: ``"kernel"`` (q/k masks
    and kernels, by head column), ``"heads"`` (a leading head axis), ``"inputs"`` or
    ``"scalar"`` (replicated); ``None`` leaves are kept, and ``mesh=None`` returns ``tree``."""
    if mesh is None or tree is None:
        return tree
    sharding = NamedSharding(mesh, _spec(kind, stacked))
    return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)


def gather(tree: Any) -> Any:
    """Brings sharded results back as host-independent arrays on the default device (a no-op in
    value), so later single-device code never mixes them with arrays of another placement."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)), tree)
