"""Pruning a model that is never whole in memory: one decoder layer at a time, from disk.

:class:`StreamedLayers` holds a model whose parameters are shapes only (``nnx.eval_shape``) and
reads each decoder layer's tensors from disk (:mod:`jaxprune.loaders.lazy`) when
:func:`jaxprune.pipeline.prune_model` opens it, dropping them when it is closed. The same loop,
the same calibration and the same method call run as for a model in memory, so the masks and
weights are the same bits. Each pruned layer is written to the run folder as it finishes
(:class:`LayerFiles`, which is also what a stopped run resumes from); evaluation carries the
evaluation windows' activations through the layers in turn (:meth:`StreamedLayers.token_nlls`),
and :func:`write_hf_folder` exports the pruned model a layer at a time.

Memory: one layer's weights (float32) and the calibration activations while pruning; the
embedding while the calibration inputs are embedded; the embedding, final norm and head plus
the activations of at most :data:`EVAL_ACTIVATION_BYTES` of evaluation windows while evaluating.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from jaxprune import layerwise, outputs
from jaxprune.checkpoints import CheckpointError
from jaxprune.loaders import hf
from jaxprune.loaders.lazy import LazyWeights
from jaxprune.loaders.params import WeightLoadError, hf_name
from jaxprune.models import model_class
from jaxprune.models.llama import head_nll, projection_kernels
from jaxprune.resume import fingerprint

# The folder of a streaming run that holds its pruned layers.
PRUNED_DIR = "pruned"
# Evaluation windows whose residual streams together take more than this go through the layers
# in several passes, each reading every layer again.
EVAL_ACTIVATION_BYTES = 1 << 30
_LAYER_FILE = re.compile(r"layer-(\d{5})\.safetensors")
_MASK = "mask."


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc(name: str):
    """glibc's function ``name``, or ``None`` where the C library is not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Make glibc give freed memory back to the system at once: allocations of 256 KiB or more
    become their own mappings (unmapped when freed), and the heap is trimmed above 1 MiB free.

    By default glibc raises its mapping threshold each time a large block is freed (up to
    32 MiB), so a streaming run's per-layer arrays come to live on the heap, where freed memory
    stays resident: on a 1.1B model its peak grew with every layer (1.15 GiB, 0.56 of the
    bfloat16 file, against 0.83 GiB with these settings). Returns False where the C library is
    not glibc (nothing is changed there)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 << 10) and mallopt(_M_TRIM_THRESHOLD, 1 << 20))


def trim_heaps() -> bool:
    """Give the free pages inside every glibc heap back to the system (``malloc_trim(0)``).

    The thresholds of :func:`return_freed_memory` trim only the top of the main heap; the heaps
    of XLA's worker threads keep the pages a closed layer's computations freed. Trimming them
    after each layer lowered the softmax-aware float32 streaming peak on a 1.1B model from
    1.05 to 0.96 GiB (0.51 to 0.47 of its bfloat16 file). Returns False where the C library is
    not glibc (nothing is done)."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def should_stream(stream: bool | str, threshold_gib: float, param_bytes: int) -> bool:
    """Whether a run streams: ``stream`` itself when true or false; for ``auto``, whether the
    model's float32 parameters exceed ``threshold_gib``."""
    if stream == "auto":
        return param_bytes > threshold_gib * 2**30
    return bool(stream)


class StreamedLayers:
    """A model read from disk a layer at a time (the streaming source of
    :func:`jaxprune.pipeline.prune_model`, see :class:`jaxprune.layerwise.ModelLayers`).

    Attributes:
      model: the family's model with every parameter a ``jax.ShapeDtypeStruct``, except the
        decoder layer that is open (and the embedding while it embeds).
      pruned: once set, the run's :class:`LayerFiles`: an opened layer carries its pruned kernels.
    """

    in_memory = False

    def __init__(self, weights: LazyWeights, dtype=jnp.float32):
        return_freed_memory()
        self.weights = weights
        self.config = weights.config
        self.dtype = dtype
        self.model_cls = model_class(self.config)
        self.model = self._abstract_model()
        self._abstract_layers = list(self.model.layers)
        self.pruned: LayerFiles | None = None
        # The state path of each prunable kernel inside a layer ("self_attn.q_proj.kernel").
        ids = {id(v): path for path, v in nnx.iter_graph(self._abstract_layers[0])}
        self._kernel_paths = {
            n: ".".join(map(str, ids[id(p)]))
            for n, p in projection_kernels(self._abstract_layers[0]).items()
        }

    def _abstract_model(self):
        return nnx.eval_shape(lambda: self.model_cls(self.config, self.dtype, rngs=nnx.Rngs(0)))

    def kernel_names(self, li: int) -> dict[str, tuple[str, Callable]]:
        """Each prunable kernel of layer ``li`` -> its Hugging Face name and the layout
        transform between the kernel ``(in, out)`` and the tensor ``(out, in)``."""
        return {
            n: hf_name(self.model_cls, f"layers.{li}.{p}") for n, p in self._kernel_paths.items()
        }

    def _filled(self, module, prefix: str, rows: np.ndarray | None = None):
        """``module`` (abstract) with every parameter read from disk, as the eager loader
        fills it (:func:`jaxprune.loaders.params.model_from_tensors`); with ``rows``, only those
        rows of each parameter (of the embedding: the tokens' rows)."""
        graphdef, state = nnx.split(module)
        flat = nnx.to_flat_state(state)
        names, problems = {}, []
        for path, _ in flat:
            key = prefix + ".".join(map(str, path))
            hit = hf_name(self.model_cls, key)
            if hit is None or hit[0] not in self.weights.shapes:
                shown = hit[0] if hit else key
                problems.append(f"missing tensor {shown} (model parameter {key})")
            else:
                names[key] = hit
        if problems:
            raise WeightLoadError(problems, self.model_cls.__name__)
        filled = []
        for path, var in flat:
            name, fn = names[prefix + ".".join(map(str, path))]
            # One tensor at a time: its stored copy is dropped before the next is read.
            value = fn(self.weights.read([name])[name])
            if rows is not None:
                value = value[rows]
            if value.shape != (var.shape if rows is None else (len(rows), *var.shape[1:])):
                problems.append(f"wrong shape for {name}: got {value.shape}, expected {var.shape}")
                continue
            filled.append((path, var.replace(jnp.asarray(value, dtype=self.dtype))))
        if problems:
            raise WeightLoadError(problems, self.model_cls.__name__)
        return nnx.merge(graphdef, nnx.from_flat_state(filled))

    def embed(self, chunks: list) -> list[jax.Array]:
        """Token chunks ``(b, t)`` -> embeddings ``(b, t, d)`` by the family's own ``embed``.

        The embedding is read for this and dropped after; only the rows of the tokens that occur
        are converted to the compute dtype, and the tokens are renumbered into them (a lookup
        gives the same values from the rows as from the whole table).
        """
        if not chunks:
            return []
        ids = np.unique(np.concatenate([np.ravel(c) for c in chunks]))
        abstract = self.model.embed_tokens
        self.model.embed_tokens = self._filled(abstract, "embed_tokens.", rows=ids)
        try:
            return [
                self.model.embed(jnp.asarray(np.searchsorted(ids, c), jnp.int32)) for c in chunks
            ]
        finally:
            self.model.embed_tokens = abstract

    def open(self, li: int):
        """Decoder layer ``li`` read from disk (with its pruned kernels once :attr:`pruned` is
        set) and put into :attr:`model`."""
        layer = self._filled(self._abstract_layers[li], f"layers.{li}.")
        if self.pruned is not None and li in self.pruned.saved_layers():
            kernels = projection_kernels(layer)
            for name, w in self.pruned.kernels(li).items():
                kernels[name][...] = jnp.asarray(w, self.dtype)
        self.model.layers[li] = layer
        return layer

    def close(self, li: int, pending=()) -> None:
        """Drops layer ``li``'s weights from :attr:`model`, and frees them now.

        Dispatch is asynchronous, so it first waits for ``pending`` (the arrays computed from
        the layer): otherwise the next layers are read while queued computations still hold
        every earlier one. And a layer's modules hold reference cycles, so without a collection
        its arrays live until Python's collector next runs, beside the next layers' (four
        layers' MLPs at once, measured)."""
        jax.block_until_ready(pending)
        self.model.layers[li] = self._abstract_layers[li]
        gc.collect()
        trim_heaps()

    def top(self):
        """The embedding, final norm and head read from disk: the family's model without
        decoder layers (its ``embed`` and ``head`` work, its ``hidden`` does not)."""
        top = self._abstract_model()
        top.layers = nnx.List([])
        return self._filled(top, "")

    def token_nlls(self, batches: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Next-token NLLs ``(b, t-1)`` of token batches ``(b, t)``, one array per batch in order
        (what :func:`jaxprune.perplexity.perplexity` takes as ``token_nlls``).

        The batches go through the model in groups whose residual streams take at most
        :data:`EVAL_ACTIVATION_BYTES` (one batch at least): a group is embedded, carried through
        every layer in turn (each read once per group), then through the final norm and head.
        """
        top = self.top()
        graphdef, state = nnx.split(top)
        d = self.config.hidden_size
        group: list[np.ndarray] = []
        size = 0
        for tokens in [*batches, None]:
            step = 0 if tokens is None else tokens.size * d * 4
            if group and (tokens is None or size + step > EVAL_ACTIVATION_BYTES):
                hs = self._through_layers(layerwise.embed_chunks(top, group))
                for toks, h in zip(group, hs, strict=True):
                    yield np.asarray(_head_nll(graphdef, state, h, jnp.asarray(toks, jnp.int32)))
                group, size = [], 0
            if tokens is not None:
                group.append(tokens)
                size += step

    def _through_layers(self, hs: list[jax.Array]) -> list[jax.Array]:
        contexts: dict[tuple[int, int], Any] = {}
        for li in range(self.config.num_layers):
            graphdef, state = nnx.split(self.open(li))
            for t in {h.shape[1] for h in hs}:
                contexts[li, t] = self.model.layer_context(li, t)
            hs = [layerwise.apply_layer(graphdef, state, h, *contexts[li, h.shape[1]]) for h in hs]
            self.close(li, hs)
        return hs


@partial(jax.jit, static_argnums=0)
def _head_nll(graphdef, state, h, tokens):
    """The final norm and head on the last layer's outputs ``h (b, t, d)``: next-token NLLs
    ``(b, t-1)`` of ``tokens (b, t)``, chunked over tokens as the model's own NLL is."""
    return head_nll(nnx.merge(graphdef, state), h, tokens)


def write_hf_folder(source: StreamedLayers, folder: Path, tokenizer=None) -> Path:
    """Writes the pruned model as a Hugging Face folder a layer at a time, as
    :func:`jaxprune.loaders.hf.write_hf_folder` writes a model in memory (float32, a tied head
    left out): one shard for the embedding, final norm and head, then one per decoder layer,
    each read from the source with its pruned matrices from :attr:`StreamedLayers.pruned`.

    Returns:
      The folder path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = source.config.to_hf_config() | {"torch_dtype": str(np.dtype(source.dtype))}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    n = source.config.num_layers + 1
    weight_map, total = {}, 0
    for k in range(n):
        li = k - 1
        module, prefix = (source.top(), "") if k == 0 else (source.open(li), f"layers.{li}.")
        tensors = {}
        for path, var in nnx.to_flat_state(nnx.state(module)):
            name, fn = hf_name(source.model_cls, prefix + ".".join(map(str, path)))
            tensors[name] = np.ascontiguousarray(fn(np.asarray(var[...])))
        if k:
            source.close(li)
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        # transformers checks this metadata key to know the tensors are PyTorch-layout.
        safetensors.numpy.save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.nbytes for t in tensors.values())
        module = tensors = None
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / hf.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    for file in folder.glob("*.safetensors"):
        shutil.copymode(folder / "config.json", file)
    return folder


class LayerFiles:
    """The pruned layers of a streaming run, one safetensors file each, written as each layer
    finishes: the run's output and what a stopped run resumes from (the same interface as
    :class:`jaxprune.resume.LayerStore`).

    ``pruned/layer-00003.safetensors`` holds layer 3's pruned matrices under their Hugging Face
    names in PyTorch layout ``(out, in)``, float32, each keep mask under ``mask.`` + that name,
    and as metadata the run's fingerprint and the layer's facts (JSON). A file is written under
    a temporary name and renamed, so one under its final name is whole. The pruned model is the
    source checkpoint with these tensors replaced.
    """

    def __init__(
        self,
        directory: str | Path,
        config: dict[str, Any],
        names: Callable[[int], dict[str, tuple[str, Callable]]],
    ):
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint(config)
        self.names = names
        self._saved: list[int] | None = None

    def path(self, layer: int) -> Path:
        """The file of layer ``layer``."""
        return self.directory / f"layer-{layer:05d}.safetensors"

    def saved_layers(self) -> list[int]:
        """Indices of the layers saved so far, ascending."""
        if self._saved is None:
            found = [_LAYER_FILE.fullmatch(p.name) for p in self.directory.glob("layer-*")]
            self._saved = sorted(int(m[1]) for m in found if m)
        return self._saved

    def save(self, layer: int, masks: dict, kernels: dict, info: dict) -> None:
        """Writes one finished layer (whole before this returns, so a kill keeps it).

        Raises:
          DiskFullError: the disk filled up (in one line).
        """
        tensors = {}
        for target, (name, fn) in self.names(layer).items():
            if target in kernels:
                tensors[name] = np.ascontiguousarray(fn(np.asarray(kernels[target])))
                tensors[_MASK + name] = np.ascontiguousarray(fn(np.asarray(masks[target])))
        meta = {"fingerprint": json.dumps(self.fingerprint), "info": json.dumps(info)}
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path(layer).with_suffix(".tmp")
        fix = " (or move the run folder to a larger disk and resume it from there)"
        try:
            with outputs.writing(
                self.directory, f"layer {layer}", outputs.tree_bytes(tensors), fix
            ):
                safetensors.numpy.save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, self.path(layer))
        finally:
            tmp.unlink(missing_ok=True)
        self._saved = sorted({*self.saved_layers(), layer})

    def _read(self, layer: int) -> tuple[dict, dict, dict]:
        """``(masks, kernels, metadata)`` of one file, masks and kernels by target name in the
        kernel layout ``(in, out)``."""
        where = self.path(layer)
        try:
            with safetensors.safe_open(where, framework="numpy") as f:
                meta = f.metadata() or {}
                keys = f.keys()  # a safe_open handle is not iterable
                tensors = {k: f.get_tensor(k) for k in keys}
            meta = {k: json.loads(v) for k, v in meta.items()}
        except Exception as err:  # safetensors and json raise several types for damaged files
            raise CheckpointError(
                f"layer file {where} cannot be read ({type(err).__name__}); delete it to redo "
                "the layer."
            ) from err
        masks, kernels = {}, {}
        for target, (name, fn) in self.names(layer).items():
            if name in tensors:
                kernels[target] = fn(tensors[name])
                masks[target] = fn(tensors[_MASK + name])
        return masks, kernels, meta

    def kernels(self, layer: int) -> dict[str, np.ndarray]:
        """Layer ``layer``'s pruned kernels ``(in, out)`` by target name."""
        return self._read(layer)[1]

    def masks(self, layer: int) -> dict[str, np.ndarray]:
        """Layer ``layer``'s keep masks ``(in, out)`` by target name."""
        return self._read(layer)[0]

    def restore(self, layer: int, like: dict) -> tuple[dict, dict, dict]:
        """Restores one layer (as :meth:`jaxprune.resume.LayerStore.restore`).

        Returns:
          ``(masks, kernels, info)``.

        Raises:
          CheckpointError: unreadable, of other settings, or of other shapes (another model).
        """
        masks, kernels, meta = self._read(layer)
        where = self.path(layer)
        if fingerprint(meta.get("fingerprint") or {}) != self.fingerprint:
            raise CheckpointError(
                f"layer file {where} was written with other settings than the run records; the "
                "run folder is mixed up, start a new run."
            )
        for part, got in (("masks", masks), ("kernels", kernels)):
            want = {k: tuple(v.shape) for k, v in like[part].items()}
            if {k: tuple(v.shape) for k, v in got.items()} != want:
                raise CheckpointError(
                    f"layer file {where} does not fit this model ({part} of shapes "
                    f"{ {k: v.shape for k, v in got.items()} }, expected {want}); was --model "
                    "changed? Resume with the run's own model, or start a new run."
                )
        return masks, kernels, meta["info"]

    def close(self) -> None:
        """Nothing to release (each file is closed as soon as it is read or written)."""
