"""D2Prune (Xiong et al., AAAI 2026, arXiv 2601.09176): dual-Taylor scores, and one of q/k/v left
without a weight update to keep the attention distribution.

The score of a weight adds an activation term to the usual one. SparseGPT's ``w^2 / U_ii^2``
(or Wanda's ``w^2 ||X_i||^2``, for a matrix pruned without update) gets

    lambda_1 * y_o * |w_io| * x_i  -  lambda_2 * w_io^2 * x_i^2,

where ``x_i`` is a scaled norm of input feature ``i`` and ``y_o`` one of output ``o`` of the
dense weight on the same calibration inputs. The paper derives it from a Taylor expansion in
the weights and in an activation shift ``delta x = lambda x`` between calibration and deployment
data (so ``lambda_1 = lambda``, ``lambda_2 = lambda^2 / 2 - lambda``); nothing in it compares the
dense model's inputs with the pruned model's: every statistic is of the inputs the already pruned
layers produce, which is what :attr:`Layer.stats <jaxprune.methods.base.Layer>` holds.

By default this is the authors' code (cquxl/D2Prune ``prune/d2prune_utils.py``,
``D2SparseGPT`` and ``D2Wanda``, driven by ``prune/prune_llama.py``, ``D2Prune_LLAMA``, with
``scripts/llama-2-7b.sh``: ``--s 1500 --r1 1 --r2 0 --d2_wanda --d2_sparsegpt
--target_layer_names "['self_attn.v_proj']"``, ``nsamples=128``):

* Every target but ``v`` is pruned by D2-SparseGPT (``D2SparseGPT.fasterprune``, blocksize 128,
  percdamp 0.01): SparseGPT with the activation term added to the saliency ``w^2 / U_ii^2`` of
  the mask choice, both for the block threshold (one threshold over all outputs of a block of
  128 inputs, every entry ``<=`` the ``int(numel * sparsity)``-th smallest pruned) and for the
  N:M choice (the ``M - N`` lowest of each group, on the weights as updated so far); the OBS
  updates are SparseGPT's, unchanged.
* ``v`` is pruned by D2-Wanda (``D2Wanda.fasterprune``), without any update: score
  ``w^2 ||X_i||^2 / n`` plus the activation term, the lowest ``int(d_in * sparsity)`` of each
  output pruned (N:M: the ``M - N`` lowest of each group of an output).
* The statistics are the authors' running accumulators over ``n`` calibration sequences ``X_j``
  (``add_batch``): ``H = 2/n sum_j X_j^T X_j``; for D2-SparseGPT
  ``x_i = sum_j (j/n) sqrt(2/j) ||X_j[:, i]|| / s``, for D2-Wanda
  ``x_i = sum_j (j/n) ||X_j[:, i]|| / s`` and ``||X_i||^2 / n = sum_j ||X_j[:, i]||^2 / n``; and
  ``y_o = sum_j (j/n) ||X_j w_o|| / s`` for both. (The ``j/n`` weights are what their in-place
  rescaling leaves: a mean was meant, but the new term is not divided by ``n``.)

The paper's attention-aware step (Eq. 12: choose, for q, k and v, update or no update by the
reconstruction error plus ``rho`` times a KL divergence of the attention distributions) is, in
the paper, a search over three configurations (one of q/k/v left without update) scored by
perplexity of the whole pruned model, done once per model; the code holds its result only as
``--target_layer_names`` (``v`` for LLaMA-2-7B, LLaMA-3-8B/70B and LLaMA-2-70B in the scripts,
``k`` for LLaMA-2-13B and OPT). That is ``select="fixed"`` here, ``no_update="v"``.

Deviations, each an option or a limit of what :class:`~jaxprune.methods.base.Layer` holds:

* Statistics (a limit). :class:`~jaxprune.methods.stats.InputStats` holds sums over all
  calibration tokens, not per-sequence norms, and not the number of sequences. The plug-in
  evaluates the authors' accumulators as if every sequence had the same per-feature sums (then
  they are exact: ``x`` and ``y`` from the diagonal of ``H`` and ``w^T H w``) at
  ``sequences`` sequences, by default the run's own calibration sequences (what their code
  counts: ``nsamples`` is the number of windows it is given; their scripts give 128, at which
  ``s`` was tuned, and ``--d2prune.sequences 128`` evaluates the terms at that count). ``H``
  and D2-Wanda's ``||X_i||^2 / n`` are exact either way. The rules themselves
  (:func:`d2_sparsegpt_prune`, :func:`d2_wanda_prune`) take the accumulators explicitly.
* Output norms ``y`` leave out projection biases (Llama has none; the authors' hook sees them).
* ``select="kl"`` (an option) makes the paper's Eq. 12 choice per layer instead of per model:
  each configuration of ``candidates`` (the projection left without update; ``none`` for all
  updated) is scored by the relative reconstruction error ``sum_t ||X (W_t - W~_t)||^2 /
  ||X W_t||^2`` of the layer's q/k/v targets plus ``kl_weight`` times the KL divergence
  ``KL(P~ || P)`` of each query's attention probabilities (pruned against dense, averaged over
  heads, sequences and queries) on ``samples`` calibration sequences, and the lowest wins. The
  paper gives no value of ``rho`` (it never evaluates the KL term); ours weighs a scale-free
  reconstruction error. The paper's outlier-ratio rule (its appendix D) and the code's
  ``--kmeans``, ``--auto_s`` and ``--dsm`` (OWL) options are not implemented.
* ``group="output"`` (an option): every output of a D2-SparseGPT matrix loses
  ``round(s * d_in)`` weights (per block, the counts telescoping), as ``sparsegpt`` does; the
  default ``block`` is the authors' threshold, which prunes one entry more per block than
  ``int(numel * sparsity)``. D2-Wanda is per output in both.
* Sparsity 0 prunes nothing (the authors' ``<=`` would prune one entry per block); ties are
  broken by index (their ``topk`` leaves the order open). The authors' ``N:M`` flags name the
  pruned count (their ``3:4`` is our ``1:4``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from jaxprune.masks import binarize, parse_nm
from jaxprune.methods.base import Layer, Method, Pruned, Request
from jaxprune.methods.sparsegpt import sparsegpt_blocks
from jaxprune.methods.stats import HIGHEST, InputStats, check_matrix
from jaxprune.models.spec import AttentionSpec
from jaxprune.objective import qk_layer_probs

# The projections whose update status the attention-aware step chooses.
QKV = ("q", "k", "v")
# Comparison groups of the D2-SparseGPT matrices; the first is the authors' (block threshold).
GROUPS = ("block", "output")
# Configurations of the attention-aware step: the projection left without update, or none.
CONFIGURATIONS = ("q", "k", "v", "none")


class Terms(NamedTuple):
    """The authors' accumulators of one matrix, as its rules use them (a pytree).

    Attributes:
      hessian: ``2/n sum_j X_j^T X_j`` ``(d_in, d_in)`` (D2-SparseGPT's ``H``).
      sq_mean: ``sum_j ||X_j[:, i]||^2 / n`` ``(d_in,)`` (D2-Wanda's ``scaler_row``).
      x_sparsegpt: D2-SparseGPT's input norms ``x_i`` ``(d_in,)``, divided by ``s``.
      x_wanda: D2-Wanda's input norms ``x_i`` ``(d_in,)``, divided by ``s``.
      y: the output norms ``y_o`` of the dense weight ``(d_out,)``, divided by ``s``.
    """

    hessian: Float[Array, "d_in d_in"]
    sq_mean: Float[Array, " d_in"]
    x_sparsegpt: Float[Array, " d_in"]
    x_wanda: Float[Array, " d_in"]
    y: Float[Array, " d_out"]


def authors_terms(
    w: Float[Array, "d_in d_out"], stats: InputStats, *, sequences: int, s: float
) -> Terms:
    """The authors' accumulators from token sums, for ``sequences`` sequences of equal sums.

    With ``n`` sequences whose per-feature sums are all ``1/n`` of the totals, the authors'
    ``add_batch`` leaves ``x_i = c ||X_i|| / (sqrt(n) s)`` with ``c = sum_j sqrt(2j) / n``
    (D2-SparseGPT, whose inputs are scaled by ``sqrt(2/j)`` first) or ``c = (n + 1) / 2``
    (D2-Wanda), and ``y_o = (n + 1) / 2 * sqrt(w_o^T H w_o / n) / s``; ``H`` and ``sq_mean`` are
    exact for any sequences.

    Args:
      w: the dense weight, input-major ``(d_in, d_out)``.
      stats: sums over the calibration tokens of its inputs.
      sequences: ``n``, the calibration sequences the accumulators are evaluated at.
      s: the authors' scaling of the activation norms.

    Returns:
      The :class:`Terms` (float32).
    """
    n = sequences
    h = stats.hessian.astype(jnp.float32)
    sq = stats.sq_norm.astype(jnp.float32)
    w = w.astype(jnp.float32)
    wh = jnp.einsum("io,ij,jo->o", w, h, w, precision=HIGHEST)
    x_seq = jnp.sqrt(sq / n)
    y_seq = jnp.sqrt(jnp.maximum(wh, 0.0) / n)
    running = (n + 1) / 2  # sum_j j / n
    scaled = sum(math.sqrt(2 * j) for j in range(1, n + 1)) / n
    return Terms(
        hessian=(2.0 / n) * h,
        sq_mean=sq / n,
        x_sparsegpt=scaled * x_seq / s,
        x_wanda=running * x_seq / s,
        y=running * y_seq / s,
    )


def activation_term(
    w: Float[Array, "d_in d_out"],
    x: Float[Array, " d_in"],
    y: Float[Array, " d_out"],
    r1: float,
    r2: float,
) -> Float[Array, "d_in d_out"]:
    """The dual-Taylor addition to a score: ``r1 * y_o |w_io| x_i - r2 * w_io^2 x_i^2``."""
    a = jnp.abs(w)
    x = x.reshape(-1, 1)
    return r1 * (y.reshape(1, -1) * a * x) - r2 * (a * a) * (x * x)


def d2_sparsegpt_prune(
    w: Float[Array, "d_in d_out"],
    hessian: Float[Array, "d_in d_in"],
    x: Float[Array, " d_in"],
    y: Float[Array, " d_out"],
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    r1: float = 1.0,
    r2: float = 0.0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    group: str = "block",
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """D2-SparseGPT (the authors' ``D2SparseGPT.fasterprune``): SparseGPT whose mask scores add
    the dual-Taylor term :func:`activation_term` to ``w^2 / U_ii^2``.

    Mask choice per pattern, on the block's weights as updated by the blocks before it:
      * ``"unstructured"``, ``group="block"`` (the authors'): one threshold over all outputs of
        the block, at the ``int(numel * sparsity)``-th smallest score, every entry at or below it
        pruned (so one more than that count; none at sparsity 0).
      * ``"unstructured"``, ``group="output"``: the lowest ``round(s*end) - round(s*start)`` of
        each output in the block, so exactly ``round(sparsity * d_in)`` per output.
      * ``"N:M"``: at every ``M``-th input, the ``M - N`` lowest of the group in each output.

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      hessian: ``H`` of the inputs ``(d_in, d_in)``, in the scale the score assumes (the
        authors': ``2/n sum_j X_j^T X_j``; see :func:`authors_terms`).
      x: the input norms of the activation term ``(d_in,)``.
      y: the output norms of the activation term ``(d_out,)``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"`` or ``"N:M"``.
      r1, r2: ``lambda_1`` and ``lambda_2``.
      blocksize: inputs per block; a multiple of ``M`` for N:M (unless it covers ``d_in``).
      percdamp: dampening, a fraction of the mean diagonal of ``H``.
      group: ``"block"`` or ``"output"``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned`` is zero where ``keep`` is False
      (and on inputs never seen), in ``w``'s dtype.
    """
    nm = _check_rule(w, x, y, sparsity, pattern, group)
    if hessian.shape != (w.shape[0],) * 2:
        raise ValueError(f"hessian has shape {hessian.shape}; w has d_in={w.shape[0]}.")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r}: give a positive integer such as 128.")
    if nm is not None and blocksize < w.shape[0] and blocksize % nm[1]:
        raise ValueError(f"blocksize={blocksize} is not a multiple of M={nm[1]} ({pattern}).")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)

    def extra(rows, first):
        # The dual-Taylor term of these rows, whose first input is `first` (static or traced).
        return activation_term(rows, lax.dynamic_slice_in_dim(x, first, rows.shape[0]), y, r1, r2)

    # SparseGPT's blocks, OBS updates and lazy updates, with the term added to its scores.
    q, keep = sparsegpt_blocks(w, hessian, None, nm, sparsity, blocksize, percdamp, group, extra)
    return q.astype(w.dtype), keep


def d2_wanda_prune(
    w: Float[Array, "d_in d_out"],
    sq_mean: Float[Array, " d_in"],
    x: Float[Array, " d_in"],
    y: Float[Array, " d_out"],
    *,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    r1: float = 1.0,
    r2: float = 0.0,
) -> tuple[Float[Array, "d_in d_out"], Bool[Array, "d_in d_out"]]:
    """D2-Wanda (the authors' ``D2Wanda.fasterprune``): no weight update; score
    ``w^2 * sq_mean_i`` plus :func:`activation_term`, the lowest ``int(sparsity * d_in)`` of each
    output pruned (N:M: the ``M - N`` lowest of each group of ``M`` inputs of an output).

    Args:
      w: weight, input-major ``(d_in, d_out)``.
      sq_mean: the inputs' squared norms per sequence, ``||X_i||^2 / n`` ``(d_in,)``.
      x: the input norms of the activation term ``(d_in,)``.
      y: the output norms of the activation term ``(d_out,)``.
      sparsity: fraction pruned in ``[0, 1)``; may be omitted for ``"N:M"``.
      pattern: ``"unstructured"`` or ``"N:M"``.
      r1, r2: ``lambda_1`` and ``lambda_2``.

    Returns:
      ``(w_pruned, keep)``, both ``(d_in, d_out)``; ``w_pruned = w * keep``.
    """
    nm = _check_rule(w, x, y, sparsity, pattern, "output")
    if sq_mean.shape != (w.shape[0],):
        raise ValueError(f"sq_mean has shape {sq_mean.shape}; w has d_in={w.shape[0]}.")
    wf = w.astype(jnp.float32)
    scores = wf**2 * sq_mean.astype(jnp.float32).reshape(-1, 1)
    scores = scores + activation_term(wf, x.astype(jnp.float32), y.astype(jnp.float32), r1, r2)
    if nm is None:
        # The authors prune int(sparsity * d_in) per output; binarize rounds, so hand it the
        # fraction whose rounded count is that floor.
        sparsity = math.floor(sparsity * w.shape[0]) / w.shape[0]
    keep = binarize(scores, sparsity, pattern, group="output")
    return jnp.where(keep, w, jnp.zeros_like(w)), keep


def _check_rule(w, x, y, sparsity, pattern, group):
    check_matrix(w, None)
    if x.shape != (w.shape[0],) or y.shape != (w.shape[1],):
        raise ValueError(
            f"x has shape {x.shape} and y {y.shape}; w {w.shape} needs ({w.shape[0]},) and "
            f"({w.shape[1]},) (input-major: x along d_in, y along d_out)."
        )
    if group not in GROUPS:
        raise ValueError(f"D2Prune group={group!r}: use one of {GROUPS}.")
    # The same errors as every other method: binarize's checks on shapes only.
    jax.eval_shape(lambda: binarize(jnp.zeros((w.shape[0], 1)), sparsity, pattern))
    return parse_nm(pattern)


def reconstruction_error(
    w: Float[Array, "d_in d_out"], w_new: Float[Array, "d_in d_out"], stats: InputStats
) -> Float[Array, ""]:
    """``||X (w_new - w)||_F^2 / ||X w||_F^2`` from the inputs' ``H = X^T X``."""
    h = stats.hessian.astype(jnp.float32)
    w = w.astype(jnp.float32)
    d = w_new.astype(jnp.float32) - w
    err = jnp.sum(d * jnp.matmul(h, d, precision=HIGHEST))
    return err / jnp.sum(w * jnp.matmul(h, w, precision=HIGHEST))


@partial(jax.jit, static_argnames=("spec",))
def attention_kl(
    wq: Float[Array, "d hdh"],
    wk: Float[Array, "d gdh"],
    wq_new: Float[Array, "d hdh"],
    wk_new: Float[Array, "d gdh"],
    x: Float[Array, "b n d"],
    *,
    spec: AttentionSpec,
    extras=None,
) -> Float[Array, ""]:
    """``KL(P_new || P)`` of each query's attention distribution over keys, averaged over heads,
    sequences and queries (the paper's ``KL(MHA(w~) || MHA(w))``).

    Args:
      wq, wk: the dense query and key kernels; wq_new, wk_new: the pruned ones.
      x: attention inputs ``(b, n, d)``.
      spec, extras: the layer's attention, as :func:`jaxprune.objective.qk_layer_probs` takes.
    """
    kw = dict(spec=spec, extras=extras)
    p = qk_layer_probs(wq, wk, x, **kw)
    p_new = qk_layer_probs(wq_new, wk_new, x, **kw)
    tiny = jnp.finfo(p.dtype).tiny
    log_ratio = jnp.log(jnp.maximum(p_new, tiny)) - jnp.log(jnp.maximum(p, tiny))
    return jnp.mean(jnp.sum(jnp.where(p_new > 0, p_new * log_ratio, 0.0), axis=-1))


@dataclasses.dataclass(frozen=True)
class D2PruneConfig:
    """D2Prune (method d2prune): dual-Taylor scores, and which of q/k/v is not updated."""

    # Scaling s of the activation norms in the dual-Taylor term (the authors' option s).
    s: float = field(default=1500.0, metadata={"range": (1e-12, None)})
    # lambda_1, the weight of the first-order term y |w| x (the authors' option r1).
    r1: float = 1.0
    # lambda_2, the weight of the second-order term, subtracted as lambda_2 w^2 x^2 (--r2).
    r2: float = 0.0
    # Calibration sequences the authors' running accumulators are evaluated at (None: the run's
    # own calibration sequences, as their code counts the windows it is given; 128 is their
    # scripts' nsamples, at which s was tuned).
    sequences: int | None = field(default=None, metadata={"range": (1, 1_000_000)})
    # How the q/k/v projection pruned without weight update is chosen: fixed (no_update, the
    # authors' code) or kl (per layer, the lowest reconstruction error + kl_weight * attention
    # KL among candidates, the paper's Eq. 12).
    select: str = field(default="fixed", metadata={"choices": ("fixed", "kl")})
    # select=fixed: the projection pruned by D2-Wanda without update (the authors'
    # target_layer_names: v in their Llama scripts but LLaMA-2-13B's, k), or none.
    no_update: str = field(default="v", metadata={"choices": CONFIGURATIONS})
    # select=kl: the configurations compared, each the projection left without update (none:
    # all updated); the paper's search space is q, k, v.
    candidates: tuple[str, ...] = field(
        default=("q", "k", "v"), metadata={"choices": CONFIGURATIONS, "nonempty": True}
    )
    # select=kl: rho, the weight of the attention KL against the relative reconstruction error.
    kl_weight: float = field(default=1.0, metadata={"range": (0.0, None)})
    # select=kl: calibration sequences of the attention KL (the first ones).
    samples: int = field(default=4, metadata={"range": (1, 4096)})
    # select=kl: tokens of each of those sequences (a causal prefix).
    seq_len: int = field(default=256, metadata={"range": (2, 32768)})
    # D2-SparseGPT: inputs per block of the OBS updates (the authors': 128).
    blocksize: int = field(default=128, metadata={"range": (1, 65536)})
    # D2-SparseGPT: dampening added to the Hessian's diagonal, relative to its mean.
    percdamp: float = field(default=0.01, metadata={"range": (0.0, 10.0)})


_sparsegpt_jit = jax.jit(
    d2_sparsegpt_prune,
    static_argnames=("sparsity", "pattern", "r1", "r2", "blocksize", "percdamp", "group"),
)
_wanda_jit = jax.jit(d2_wanda_prune, static_argnames=("sparsity", "pattern", "r1", "r2"))
_terms_jit = jax.jit(authors_terms, static_argnames=("sequences", "s"))
_reconstruction_jit = jax.jit(reconstruction_error)


def _sequences(request: Request, opts: D2PruneConfig) -> int:
    """The sequence count of the authors' accumulators: the option, else the run's own."""
    n = opts.sequences or request.calibration_sequences
    if n is None:
        raise ValueError(
            "method 'd2prune' needs the number of calibration sequences its statistics were "
            "summed over: set d2prune.sequences, or pass Request(calibration_sequences=...)."
        )
    return n


def _prune_one(w, stats, request: Request, opts: D2PruneConfig, updated: bool):
    if stats is None:
        raise ValueError("method 'd2prune' needs calibration statistics (see update_stats).")
    terms = _terms_jit(w, stats, sequences=_sequences(request, opts), s=opts.s)
    kw = dict(sparsity=request.sparsity, pattern=request.pattern, r1=opts.r1, r2=opts.r2)
    if not updated:
        return _wanda_jit(w, terms.sq_mean, terms.x_wanda, terms.y, **kw)
    return _sparsegpt_jit(
        w,
        terms.hessian,
        terms.x_sparsegpt,
        terms.y,
        blocksize=opts.blocksize,
        percdamp=opts.percdamp,
        group=request.group or GROUPS[0],
        **kw,
    )


def prune_matrix(w, stats: InputStats | None, request: Request, options: D2PruneConfig | None):
    """One matrix by D2-SparseGPT with the section's options (what d2prune does to every target
    but the one left without update), so other methods may hand matrices to it."""
    return _prune_one(w, stats, request, options or D2PruneConfig(), updated=True)


def attention_inputs(opts: D2PruneConfig) -> tuple[int, int] | None:
    """The calibration attention inputs the KL choice needs (none for ``select="fixed"``)."""
    return (opts.samples, opts.seq_len) if opts.select == "kl" else None


def prune(layer: Layer, request: Request, opts: D2PruneConfig | None) -> Pruned:
    """One layer: every target by D2-SparseGPT but the q/k/v projection left without update,
    which D2-Wanda prunes; that projection is ``no_update`` or, with ``select="kl"``, this
    layer's best of ``candidates``."""
    opts = opts or D2PruneConfig()
    qkv = [t for t in QKV if t in request.targets]
    done: dict[tuple[str, bool], Any] = {}

    def result(t, updated):
        if (t, updated) not in done:
            done[t, updated] = _prune_one(
                layer.weights[t], layer.stats.get(t), request, opts, updated
            )
        return done[t, updated]

    facts: dict[str, Any] = {}
    if opts.select == "kl":
        choice, facts["d2prune_candidates"] = _choose_by_kl(layer, opts, qkv, result)
    else:
        choice = opts.no_update if opts.no_update in qkv else "none"
    facts["d2prune_no_update"] = choice
    weights, masks = {}, {}
    for t in request.targets:
        weights[t], masks[t] = result(t, updated=t != choice)
    return Pruned(weights, masks, facts)


def _choose_by_kl(layer: Layer, opts: D2PruneConfig, qkv, result):
    """The configuration of ``opts.candidates`` (those that apply to the targets) with the
    lowest relative reconstruction error of the q/k/v targets plus ``kl_weight`` times the
    attention KL, and every candidate's terms."""
    x = layer.attention_inputs
    if x is None:
        raise ValueError(
            "d2prune.select=kl needs the layer's calibration attention inputs "
            "(Layer.attention_inputs); the pipeline supplies them for this method."
        )
    dense = layer.weights
    scores = {}
    for c in dict.fromkeys(opts.candidates):
        if c != "none" and c not in qkv:
            continue
        new = {t: result(t, updated=t != c)[0] for t in qkv}
        rec = sum(float(_reconstruction_jit(dense[t], new[t], layer.stats[t])) for t in qkv)
        kl = float(
            attention_kl(
                dense["q"],
                dense["k"],
                new.get("q", dense["q"]),
                new.get("k", dense["k"]),
                x,
                spec=layer.spec,
                extras=layer.extras,
            )
        )
        scores[c] = {"objective": rec + opts.kl_weight * kl, "reconstruction": rec, "kl": kl}
    if not scores:
        return "none", scores
    return min(scores, key=lambda c: scores[c]["objective"]), scores


def check(request: Request, opts: D2PruneConfig, input_dims) -> None:
    """Refuses a block size that would split the N:M groups of a D2-SparseGPT matrix."""
    nm = parse_nm(request.pattern)
    if nm is None or opts.blocksize % nm[1] == 0:
        return
    if any(opts.blocksize < input_dims[t] for t in request.targets):
        raise ValueError(
            f"d2prune.blocksize={opts.blocksize} is not a multiple of M={nm[1]} (pattern "
            f"{request.pattern}); its blocks would split N:M groups: use a multiple of {nm[1]}."
        )


METHOD = Method(
    name="d2prune",
    prune=prune,
    description="D2Prune (Xiong et al. 2026): dual-Taylor SparseGPT, one of q/k/v not updated",
    section=D2PruneConfig,
    groups=GROUPS,
    attention_inputs=attention_inputs,
    check=check,
    prune_matrix=prune_matrix,
)
