"""Solvers for relaxed pruning masks: Algorithm 1 (gradient descent from ``M = 1``) and optax.

Every solve runs its steps inside one jit-compiled ``lax.scan`` per chunk of ``chunk_steps`` steps;
between chunks the host updates the progress bar, checks for divergence and writes checkpoints.
Chunk boundaries depend only on ``steps`` and ``chunk_steps``, so a solve resumed from a checkpoint
runs the same compiled chunks as an uninterrupted one and ends with the same masks and history.

Step size of plain gradient descent (``optimizer="gd"``, ``step_size=None``): ``1/L`` with ``L``
the largest Hessian eigenvalue magnitude at the start point, estimated by power iteration on
Hessian-vector products (forward-over-reverse ``jax.jvp`` of the gradient). ``L`` is a local
estimate of the smoothness constant that the paper's convergence proof needs, so each step is
also guarded: a step that would raise the loss is rejected and the step size halved. The recorded
loss therefore never increases.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxprune import checkpoints
from jaxprune.errors import UserError
from jaxprune.objective import _merged_terms, attention_pruning_grad, attention_pruning_loss

OPTIMIZERS = ("gd", "sgd", "adam")
SCHEDULES = ("constant", "cosine")
HISTORY_KEYS = ("loss", "attention", "grad_norm", "step_size")


class SolveDivergedError(UserError, RuntimeError):
    """The loss became NaN/inf or grew past the divergence limit."""


@dataclasses.dataclass
class SolveResult:
    """Outcome of a solve.

    Attributes:
      masks: the continuous masks, same pytree as the start point.
      history: per-step arrays (length ``steps``) ``loss``, ``attention``, ``grad_norm`` and
        ``step_size``, each measured at the iterate before that step's update.
      final_loss: the loss at the returned masks (on all of ``data``).
      step_size: the initial step size used (derived or given).
      initial_loss: the loss at the start point (on all of ``data``; with a ``minibatch``,
        ``history["loss"][0]`` is the first batch's).
      final_attention: ``aux["attention"]`` (else the loss) at the returned masks, on all of
        ``data``.
    """

    masks: Any
    history: dict[str, np.ndarray]
    final_loss: float
    step_size: float
    initial_loss: float = float("nan")
    final_attention: float = float("nan")


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def smoothness_estimate(
    grad_fn: Callable, masks: Any, data: Any = (), iters: int = 20, seed: int = 0
) -> float:
    """Largest Hessian eigenvalue magnitude of the loss at ``masks`` by power iteration.

    Args:
      grad_fn: gradient of the loss, a pure function ``(masks, data) -> grads``.
      masks: the point where the curvature is measured.
      data: the arrays the loss depends on (passed to the compiled function, not baked in).
      iters: power-iteration steps.
      seed: seed of the random start vector.

    Returns:
      The estimate ``L`` (a Python float, at least 1e-12).
    """
    leaves, treedef = jax.tree.flatten(masks)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    v = treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )

    @jax.jit
    def power(v, masks, data):
        def body(_, carry):
            v, _ = carry
            v = jax.tree.map(lambda t: t / jnp.sqrt(_tree_dot(v, v)), v)
            hv = jax.jvp(lambda m: grad_fn(m, data), (masks,), (v,))[1]
            return hv, jnp.abs(_tree_dot(v, hv))

        return jax.lax.fori_loop(0, iters, body, (v, jnp.zeros((), leaves[0].dtype)))[1]

    return max(float(power(v, masks, data)), 1e-12)


def _optax(optimizer: str, step_size: float, schedule: str, steps: int):
    lr = step_size if schedule == "constant" else optax.cosine_decay_schedule(step_size, steps)
    return {"sgd": optax.sgd, "adam": optax.adam}[optimizer](lr)


def _project(masks, project: bool):
    return jax.tree.map(lambda m: jnp.clip(m, 0.0, 1.0), masks) if project else masks


def _grad_norm(g):
    return jnp.sqrt(_tree_dot(g, g))


@functools.cache
def _autograd(loss_fn):
    return jax.grad(lambda m, d: loss_fn(m, d)[0])


@functools.cache
def _compiled_steps(loss_fn, grad_fn, optimizer, step_size, schedule, steps, project, minibatch):
    """The jit-compiled solver steps, built once per loss function and setting: a solve of the
    next layer with the same (identical) loss function reuses the compilations instead of
    tracing and compiling again (XLA caches by the function object)."""
    grad_fn = grad_fn or _autograd(loss_fn)
    opt = None if optimizer == "gd" else _optax(optimizer, step_size, schedule, steps)

    def evaluate(m, data):
        loss, aux = loss_fn(m, data)
        return loss, aux.get("attention", loss), grad_fn(m, data)

    def gd_step(data, state, _):
        m, eta, loss, attn, g = (
            state["masks"],
            state["eta"],
            state["loss"],
            state["attn"],
            state["grad"],
        )
        cand = _project(jax.tree.map(lambda a, b: a - eta * b, m, g), project)
        c_loss, c_attn, c_grad = evaluate(cand, data)
        accept = c_loss <= loss
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)  # noqa: E731
        record = (loss, attn, _grad_norm(g), eta)
        new = dict(
            masks=pick(cand, m),
            eta=jnp.where(accept, eta, eta / 2),
            loss=pick(c_loss, loss),
            attn=pick(c_attn, attn),
            grad=pick(c_grad, g),
            opt=state["opt"],
            step=state["step"] + 1,
        )
        return new, record

    def optax_step(data, state, _):
        m = state["masks"]
        if minibatch is not None:
            data = minibatch(data, state["step"])
        loss, attn, g = evaluate(m, data)
        updates, opt_state = opt.update(g, state["opt"], m)
        new_m = _project(optax.apply_updates(m, updates), project)
        lr = step_size if schedule == "constant" else opt_lr(state["step"])
        record = (loss, attn, _grad_norm(g), jnp.asarray(lr, loss.dtype))
        new = dict(state, masks=new_m, opt=opt_state, step=state["step"] + 1)
        return new, record

    opt_lr = optax.cosine_decay_schedule(step_size, steps) if schedule == "cosine" else None
    step_fn = gd_step if optimizer == "gd" else optax_step

    # The state is donated: each chunk's new state takes the old one's buffers (masks,
    # optimiser moments, gradient), so a solve holds one state, not two.
    @partial(jax.jit, static_argnums=2, donate_argnums=0)
    def run_chunk(state, data, length):
        state, rec = jax.lax.scan(partial(step_fn, data), state, None, length=length)
        return state, jnp.stack(rec)

    def initial_state(m, data):
        loss, attn, g = evaluate(m, data)
        opt_state = opt.init(m) if opt is not None else ()
        return dict(
            # A copy, never the caller's start (run_chunk donates the state's buffers).
            masks=jax.tree.map(jnp.copy, m),
            eta=jnp.asarray(step_size, jax.tree.leaves(m)[0].dtype),
            loss=loss,
            attn=attn,
            # Only gradient descent reads the last gradient; an optax solve keeps none (one mask
            # set less in memory).
            grad=g if opt is None else None,
            opt=opt_state,
            step=jnp.zeros((), jnp.int32),
        )

    # The second form takes the start's buffers for the state (donate_init of solve_masks).
    return run_chunk, jax.jit(initial_state), jax.jit(initial_state, donate_argnums=0)


def solve_masks(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]],
    init: Any,
    *,
    steps: int,
    data: Any = (),
    optimizer: str = "gd",
    step_size: float | None = None,
    schedule: str = "constant",
    project: bool = True,
    grad_fn: Callable[[Any], Any] | None = None,
    chunk_steps: int = 25,
    power_iters: int = 20,
    divergence_factor: float = 1e6,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    stop_after: int | None = None,
    donate_init: bool = False,
    minibatch: Callable[[Any, jax.Array], Any] | None = None,
    progress: bool = True,
    desc: str = "solve",
) -> SolveResult:
    """Minimises ``loss_fn`` over a pytree of masks.

    Args:
      loss_fn: pure ``(masks, data) -> (loss, aux)``; ``aux["attention"]`` is recorded when
        present.
      init: start point (Algorithm 1 starts from ones).
      steps: number of update steps.
      data: pytree of the arrays the loss reads (inputs, weights, targets). They are arguments of
        the compiled steps rather than closed-over constants, which XLA would fold and copy.
      optimizer: ``"gd"`` (Algorithm 1, monotone), ``"sgd"`` or ``"adam"`` (optax).
      step_size: step size / learning rate; ``None`` with ``"gd"`` derives ``1/L`` (module doc).
      schedule: ``"constant"`` or ``"cosine"`` decay (optax optimisers).
      project: clip the masks to ``[0, 1]`` after every update.
      grad_fn: optional ``(masks, data) -> grads`` (e.g. the closed form); default ``jax.grad``.
      chunk_steps: steps per compiled ``lax.scan`` chunk (progress and checkpoint granularity).
      power_iters: power-iteration steps for the derived step size.
      divergence_factor: a loss above this multiple of the initial loss counts as divergence.
      checkpoint_dir: where to save and resume (orbax); ``None`` for no checkpoints.
      checkpoint_every: save every this many steps (a multiple of ``chunk_steps``).
      stop_after: stop (after checkpointing) once this many steps are done, to emulate a stop.
      donate_init: the solve may take ``init``'s buffers (its arrays are deleted, one mask set
        less in memory); only where the caller never reads ``init`` again.
      minibatch: optional ``(data, step) -> data``, the part of ``data`` step ``step`` reads
        (stochastic steps; optax optimisers only). The start's and the final loss read all of
        ``data``. It is part of the compiled steps' cache key, so pass the same (hashable)
        object for every solve of a setting; its ``repr`` goes into the checkpoint fingerprint.
      progress: show a tqdm bar.
      desc: label of the progress bar.

    Returns:
      A :class:`SolveResult`.

    Raises:
      ValueError: settings out of range.
      SolveDivergedError: a non-finite or exploding loss, with the step where it happened.
      checkpoints.CheckpointError: an unusable checkpoint folder.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {OPTIMIZERS}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}.")
    if steps < 1 or chunk_steps < 1:
        raise ValueError(f"steps ({steps}) and chunk_steps ({chunk_steps}) must be >= 1.")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}.")
    if optimizer != "gd" and step_size is None:
        raise ValueError(f"optimizer={optimizer!r} needs a step_size (learning rate).")
    if minibatch is not None and optimizer == "gd":
        raise ValueError(
            "optimizer='gd' compares each step's loss with the last, so every step must read "
            "the same data: use optimizer='adam' or 'sgd' with a minibatch."
        )
    if checkpoint_every is not None and (checkpoint_every % chunk_steps or checkpoint_every < 1):
        raise ValueError(
            f"checkpoint_every={checkpoint_every} must be a positive multiple of "
            f"chunk_steps={chunk_steps} so that resumed and uninterrupted solves match."
        )
    init = jax.tree.map(jnp.asarray, init)
    if step_size is None:
        step_size = 1.0 / smoothness_estimate(
            grad_fn or _autograd(loss_fn), init, data, iters=power_iters
        )
    step_size = float(step_size)
    run_chunk, initial_state, initial_state_donating = _compiled_steps(
        loss_fn, grad_fn, optimizer, step_size, schedule, steps, project, minibatch
    )
    state = (initial_state_donating if donate_init else initial_state)(init, data)
    # On all of data (the history's first loss is the first batch's with a minibatch).
    start_loss = float(state["loss"])
    history = np.full((len(HISTORY_KEYS), steps), np.nan, dtype=np.float64)
    done = 0
    manager = None
    meta = dict(
        # The state's layout (2: no gradient in an optax solve's state): a checkpoint of
        # another layout is refused as another solve's.
        state_layout=2,
        steps=steps,
        optimizer=optimizer,
        step_size=float(step_size),
        schedule=schedule,
        project=project,
        chunk_steps=chunk_steps,
    )
    if minibatch is not None:
        meta["minibatch"] = repr(minibatch)
    if checkpoint_dir is not None:
        manager = checkpoints.make_manager(checkpoint_dir)
        restored = checkpoints.restore_latest(manager, {"solver": state, "history": history}, meta)
        if restored is not None:
            done, tree = restored
            state, history = tree["solver"], np.asarray(tree["history"])

    # disable=None: tqdm hides itself when stderr is not a terminal (logs stay readable).
    bar = tqdm(
        total=steps, initial=done, desc=desc, disable=None if progress else True, leave=False
    )
    try:
        while done < steps:
            length = min(chunk_steps, steps - done)
            state, rec = run_chunk(state, data, length)
            rec = np.asarray(rec, dtype=np.float64)
            history[:, done : done + length] = rec
            _check_divergence(rec[0], done, start_loss, divergence_factor, step_size)
            done += length
            bar.update(length)
            bar.set_postfix(loss=f"{rec[0, -1]:.4g}")
            if manager is not None and checkpoint_every and done % checkpoint_every == 0:
                checkpoints.save(manager, done, {"solver": state, "history": history}, meta)
            if stop_after is not None and done >= stop_after:
                break
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    if optimizer == "gd":  # the state holds the loss at its masks, on all of data
        final, final_attention = float(state["loss"]), float(state["attn"])
    else:
        loss, aux = loss_fn(state["masks"], data)
        final, final_attention = float(loss), float(aux.get("attention", loss))
    if not np.isfinite(final):
        raise SolveDivergedError(
            f"the loss is {final} after step {done}; use a smaller step_size than {step_size:.3g}."
        )
    return SolveResult(
        masks=state["masks"],
        history=dict(zip(HISTORY_KEYS, history[:, :done], strict=True)),
        final_loss=final,
        step_size=float(step_size),
        initial_loss=start_loss,
        final_attention=final_attention,
    )


def _check_divergence(losses, start, initial, factor, step_size):
    bad = ~np.isfinite(losses) | (losses > factor * max(abs(initial), 1e-30))
    if bad.any():
        step = start + int(np.argmax(bad))
        raise SolveDivergedError(
            f"the solve diverged at step {step}: loss {losses[np.argmax(bad)]:.4g} (start "
            f"{initial:.4g}). Use a smaller step_size than {step_size:.3g}, or optimizer='gd' "
            "with step_size=None (derived, monotone)."
        )


def solve_mask(
    weight: jax.Array,
    x: jax.Array,
    *,
    lam: float,
    steps: int,
    step_size: float | None = None,
    causal: bool = True,
    closed_form: bool = True,
    **kwargs,
) -> SolveResult:
    """Algorithm 1 on the merged form: minimise :func:`attention_pruning_loss` from ``M = 1``.

    Args:
      weight: merged attention weight ``(d, d)``; x: inputs ``(n, d)`` or ``(b, n, d)``.
      lam: regulariser weight; steps: update steps; causal: causal mask.
      step_size: ``None`` derives ``1/L`` (see module doc).
      closed_form: use the paper's closed-form gradient (else ``jax.grad``).
      **kwargs: passed to :func:`solve_masks` (optimizer, schedule, checkpoints, ...).

    Returns:
      A :class:`SolveResult` whose ``masks`` is the ``(d, d)`` relaxed mask.
    """

    def loss_fn(m, data):
        attn = _merged_terms(m, *data, causal)[0]
        return attn + 0.5 * lam * jnp.sum(m * m), {"attention": attn}

    def grad_fn(m, data):
        if closed_form:
            return attention_pruning_grad(m, *data, lam=lam, causal=causal)
        return jax.grad(attention_pruning_loss)(m, *data, lam=lam, causal=causal)

    return solve_masks(
        loss_fn,
        jnp.ones_like(weight),
        data=(weight, x),
        steps=steps,
        step_size=step_size,
        grad_fn=grad_fn,
        **kwargs,
    )
