"""How :mod:`authors_check` calls each authors' pruning code: their arguments, and the glue.

One adapter per method runs the repository's own layer-by-layer driver, unchanged, on a
transformers Llama model held on the CPU, with the arguments their README command passes
(:func:`authors_arguments` maps a run's settings to them and refuses a run whose settings the
authors' code, so run, does not have). The drivers and the pruning functions they call:

- Wanda (locuslab/wanda): ``lib/prune.py`` ``prune_wanda``.
- SparseGPT (IST-DASLab/sparsegpt): ``llama.py`` ``llama_sequential`` ->
  ``sparsegpt.py`` ``SparseGPT.fasterprune``.
- ADMM (fmfi-compbio/admm-pruning): ``lib/prune.py`` ``prune_admm`` -> ``lib/admm.py``
  ``AdmmPruner.fasterprune`` (README: ``main.py --prune_method admm --sparsity_ratio 0.5
  --sparsity_type unstructured`` or ``2:4``).
- ALPS (mazumder-lab/ALPS): ``llama.py`` ``llama_sequential`` -> ``alps.py``
  ``ALPS_prune.ALPS_admm`` (README: ``llama.py MODEL c4 ALPS {sparsity}``; N:M with
  ``--nm_n --nm_m``).
- D2Prune (cquxl/D2Prune): ``prune/prune_llama.py`` ``D2Prune_LLAMA.prune_llm`` ->
  ``prune/d2prune_utils.py`` ``D2SparseGPT`` / ``D2Wanda`` (``scripts/llama-2-7b.sh``:
  ``--s 1500 --r1 1 --r2 0 --d2_wanda --d2_sparsegpt --target_layer_names
  "['self_attn.v_proj']"``; N:M with ``--prune_n --prune_m``).

What is adapted, always outside the authors' functions:

- Data: their calibration loaders (which read the hub or their local dataset copies) are not
  called; ``get_loaders`` returns our windows (Wanda, ADMM) or the driver is handed them
  (SparseGPT, ALPS, D2Prune). ``nsamples`` is the number of our windows.
- Targets: their ``find_layers`` (a module function, or D2Prune's classmethod) lists only the
  run's targets (``qk``, ``attn`` or ``all``).
- Device: the model stays on the CPU (``hf_device_map`` is empty, the device passed is the CPU,
  D2Prune's ``args.device`` is ``"cpu"``); ``torch.cuda.synchronize`` is a no-op. ALPS's
  ``ALPS_admm`` moves tensors to the literal device ``'cuda:0'`` (``W.to('cuda:0')``, its
  module's ``dev = 'cuda:0'``), which a CPU-only torch refuses ("Torch not compiled with CUDA
  enabled"): while it runs, ``Tensor.to`` sends a CUDA device to the CPU instead
  (:func:`cuda_as_cpu`); nothing else of it changes.
- Imports: modules that their files import at the top but that this path never uses are
  stand-ins where not installed: ``datasets`` (Wanda, ADMM ``lib/data.py``), ``pandas`` (ALPS
  ``llama.py``), ``sklearn.cluster`` (D2Prune's ``--kmeans``), ``toml`` and ``loguru``
  (D2Prune ``utils/tools.py``). D2Prune's package ``__init__`` files import lm-eval,
  accelerate and Pruner-Zero (which needs ``datasets``, scikit-learn and ``transformers.AdamW``,
  gone from transformers 5): ``prune/prune_llama.py`` and ``utils/tools.py`` are loaded as
  modules of bare packages (those ``__init__`` files not run) and ``prune.pruner_zero`` is a
  stand-in; ``timeit`` is theirs.
- Globals their ``__main__`` sets: SparseGPT's and ALPS's ``llama_sequential`` read a module
  global ``args``, set here; D2Prune's args namespace (built by ``cfg/args.py`` from the
  script's flags) is built here, with a :mod:`logging` logger as ``args.logger``; the model gets
  the ``seqlen`` (Wanda, SparseGPT, ADMM, ALPS) or ``seq_len`` (D2Prune) attribute their loaders
  set.
- transformers >= 4.48 (done by :mod:`authors_check`): decoder layers are given the rotary
  tables that the authors' layer-by-layer calls do not pass.

N:M flags: Wanda, SparseGPT and D2Prune name the count pruned in each group of ``M`` (their
``topk(..., largest=False)`` marks it), ALPS the count kept, and ADMM hard-codes 2 kept of 4;
ours (``N:M``) is the count kept.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxprune.prune_config import METHOD_GROUPS

# Our target letters -> the Llama module names the authors' find_layers returns.
MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# A file that only that method's repository has at this path: how a checkout is recognised.
MARKERS = {
    "wanda": "lib/prune.py",
    "sparsegpt": "sparsegpt.py",
    "admm": "lib/admm.py",
    "alps": "alps.py",
    "d2prune": "prune/d2prune_utils.py",
}

# Our settings whose values the authors' code hard-codes (in the driver, or as defaults of the
# pruning function that the driver does not pass): a run that changes one has no counterpart.
FIXED = {
    "wanda": {},
    "sparsegpt": {},
    # prune_admm passes percdamp=0.1; fasterprune's defaults iterative_prune=15, iters=20,
    # per_out=False; rho = 1 in its body; per-matrix masks at the final sparsity from the start.
    "admm": {
        "admm.iterations": 20,
        "admm.gradual_iterations": 15,
        "admm.percdamp": 0.1,
        "admm.rho": 1.0,
        "admm.matrix_schedule": "full",
    },
    # llama_sequential passes rho=0.1; ALPS_admm's defaults max_iter=300, update_iter=3,
    # switch_iter=30; in its body damp 0.01 and cg_batch(rtol=1e-4, maxiter=10).
    "alps": {
        "alps.rho": 0.1,
        "alps.max_iter": 300,
        "alps.update_iter": 3,
        "alps.switch_iter": 30,
        "alps.percdamp": 0.01,
        "alps.cg_iters": 10,
        "alps.cg_rtol": 1e-4,
    },
    # prune_layer_weight calls D2SparseGPT.fasterprune with its defaults blocksize=128,
    # percdamp=.01 (the --percdamp flag is not passed on); the q/k/v choice is the script's
    # --target_layer_names, fixed per model.
    "d2prune": {
        "d2prune.select": "fixed",
        "d2prune.blocksize": 128,
        "d2prune.percdamp": 0.01,
    },
}


def _nm(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ValueError(
            f"pattern={pattern!r}: the authors' code has unstructured and N:M masks only."
        )
    return n, m


def authors_arguments(cfg: dict, n_calibration: int) -> tuple[dict, list[str]]:
    """The arguments the authors' code is called with for a run, and notes on the comparison.

    Args:
      cfg: the run's settings as one flat mapping of dotted keys
        (:func:`jaxprune.prune_config.flat_settings` of its ``metrics.json`` config).
      n_calibration: the number of calibration windows (the authors' ``nsamples``).

    Returns:
      ``(arguments, notes)``: the authors' argument names and values for the run's method
      (those of their args namespace or driver call), and lines that say where the two runs
      still differ by construction.

    Raises:
      ValueError: the run has a setting that the authors' code, as their README runs it, does
        not have (the line names the key, the run's value and the authors').
    """
    method = cfg["method"]
    if method not in MARKERS:
        raise ValueError(f"method={method!r}: the check knows {sorted(MARKERS)}.")
    group, default = cfg.get("group"), METHOD_GROUPS[method][0]
    if group not in (None, default):
        raise ValueError(
            f"group={group!r}: the authors' {method} code has only its own grouping "
            f"({default!r}); pass a run with the default group."
        )
    for key, allowed in (
        ("calibration.protocol", "standard"),
        ("calibration.layer_inputs", "sequential"),
        ("layers", None),
    ):
        if cfg.get(key, allowed) != allowed:
            raise ValueError(
                f"{key}={cfg[key]!r}: the authors' code runs {allowed!r} (fixed-length windows, "
                "every layer, each calibrated on the pruned layers' outputs)."
            )
    for key, value in FIXED[method].items():
        if cfg.get(key, value) != value:
            raise ValueError(
                f"{key}={cfg[key]!r}: the authors' {method} code runs {value!r}; pass a run "
                "with that setting."
            )
    nm = _nm(cfg["pattern"])
    sparsity = cfg["sparsity"] if nm is None else 1 - nm[0] / nm[1]
    pruned = (0, 0) if nm is None else (nm[1] - nm[0], nm[1])
    notes: list[str] = []
    if method == "wanda":
        args = dict(sparsity_ratio=sparsity, prune_n=pruned[0], prune_m=pruned[1])
        args["use_variant"] = False
    elif method == "sparsegpt":
        args = dict(sparsity=sparsity, prunen=pruned[0], prunem=pruned[1])
        args["percdamp"] = cfg.get("sparsegpt.percdamp", 0.01)
        args["blocksize"] = cfg.get("sparsegpt.blocksize", 128)
    elif method == "admm":
        if nm not in (None, (2, 4)):
            raise ValueError(
                f"pattern={cfg['pattern']!r}: the authors' ADMM keeps 2 of every 4 for any N:M "
                "flag (its fasterprune hard-codes groups of 4); only 2:4 has a counterpart."
            )
        args = dict(sparsity_ratio=sparsity, prune_n=pruned[0], prune_m=pruned[1])
    elif method == "alps":
        kept = (0, 0) if nm is None else nm
        args = dict(sp=sparsity, nm_n=kept[0], nm_m=kept[1])
    else:
        no_update = cfg.get("d2prune.no_update", "v")
        args = dict(sparsity_ratio=sparsity, prune_n=pruned[0], prune_m=pruned[1])
        args |= {k: cfg.get(f"d2prune.{k}", v) for k, v in (("s", 1500.0), ("r1", 1.0))}
        args["r2"] = cfg.get("d2prune.r2", 0.0)
        args["target_layer_names"] = [] if no_update == "none" else [MODULES[no_update]]
        # Runs before the default followed the calibration count stored 128 explicitly.
        sequences = cfg.get("d2prune.sequences") or n_calibration
        if sequences != n_calibration:
            notes.append(
                f"d2prune.sequences={sequences} but {n_calibration} calibration windows: the "
                f"authors' running sums are over the {n_calibration} windows, ours are "
                f"evaluated at {sequences} sequences, so the two scores weigh their "
                "activation terms differently (not a like-for-like check)."
            )
    return args, notes


@contextlib.contextmanager
def _patched(obj, **attrs) -> Iterator[None]:
    """Sets attributes for the duration, then restores what ``obj`` itself held (an attribute
    it only inherited is deleted again, so a class method comes back as it was)."""
    missing = object()
    old = {k: vars(obj).get(k, missing) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(obj, k)
            else:
                setattr(obj, k, v)


def _only_targets(find_layers, names):
    """``find_layers`` keeping the run's targets. Their recursion calls the patched name again,
    and filtering full names is the same at every depth."""

    def find(*args, **kwargs):
        found = find_layers(*args, **kwargs)
        return {n: m for n, m in found.items() if n in names}

    return find


def _stand_in(name: str, **attrs) -> None:
    """An empty module under ``name`` where none is installed (imported, never used here)."""
    if name in sys.modules or importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        _stand_in(parent)
        setattr(sys.modules[parent], child, module)


def _unused(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in here: the authors' path checked never uses it.")

    return fail


def _bare_package(name: str, folder: Path) -> types.ModuleType:
    """A package whose submodules load from ``folder`` without running its ``__init__``."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    return package


@contextlib.contextmanager
def cuda_as_cpu() -> Iterator[None]:
    """While it runs, ``tensor.to("cuda:0")`` (or any CUDA device) moves to the CPU instead."""
    import torch

    to = torch.Tensor.to

    def is_cuda(device):
        return (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"
        )

    def to_cpu(self, *args, **kwargs):
        args = tuple("cpu" if is_cuda(a) else a for a in args)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    with _patched(torch.Tensor, to=to_cpu):
        yield


@contextlib.contextmanager
def _no_cuda_sync() -> Iterator[None]:
    import torch

    with _patched(torch.cuda, synchronize=lambda *a, **k: None):
        yield


def _loader(calib: np.ndarray):
    import torch

    return [(torch.tensor(w[None], dtype=torch.long), None) for w in calib]


def _lib_prune(model, ns, calib: np.ndarray, names: set[str], function: str) -> None:
    """Calls ``lib/prune.py``'s ``function(args, model, tokenizer, device, prune_n, prune_m)``,
    the driver shape of locuslab/wanda and of the ADMM repository built on it, with our
    calibration windows as their loader and only the run's targets as their layers."""
    import torch

    _stand_in("datasets", load_dataset=_unused("datasets.load_dataset"))
    import lib.prune as authors

    loader = _loader(calib)
    with (
        _no_cuda_sync(),
        _patched(
            authors,
            get_loaders=lambda *a, **k: (loader, None),
            find_layers=_only_targets(authors.find_layers, names),
        ),
    ):
        getattr(authors, function)(ns, model, None, torch.device("cpu"), ns.prune_n, ns.prune_m)


def _wanda(model, args: dict, calib: np.ndarray, names: set[str]) -> None:
    ns = argparse.Namespace(nsamples=len(calib), seed=0, **args)
    _lib_prune(model, ns, calib, names, "prune_wanda")


def _sparsegpt(model, args: dict, calib: np.ndarray, names: set[str]) -> None:
    import llama as authors
    import torch

    ns = argparse.Namespace(
        nsamples=len(calib),
        true_sequential=False,  # their README's commands do not pass --true-sequential
        minlayer=-1,
        maxlayer=1000,
        prune_only="",
        invert=False,
        wbits=16,
        gmp=False,
        **args,
    )
    with (
        _no_cuda_sync(),
        _patched(authors, args=ns, find_layers=_only_targets(authors.find_layers, names)),
    ):
        authors.llama_sequential(model, _loader(calib), torch.device("cpu"))


def _admm(model, args: dict, calib: np.ndarray, names: set[str]) -> None:
    ns = argparse.Namespace(nsamples=len(calib), seed=0, prune_method="admm", **args)
    _lib_prune(model, ns, calib, names, "prune_admm")


def _alps(model, args: dict, calib: np.ndarray, names: set[str]) -> None:
    import torch

    _stand_in("pandas")
    import llama as authors

    ns = argparse.Namespace(nsamples=len(calib), method="ALPS", seed=0, **args)
    with (
        _no_cuda_sync(),
        cuda_as_cpu(),
        _patched(authors, args=ns, find_layers=_only_targets(authors.find_layers, names)),
    ):
        authors.llama_sequential(model, _loader(calib), torch.device("cpu"), nsamples=len(calib))


def _d2prune(model, args: dict, calib: np.ndarray, names: set[str], repo: Path) -> None:
    _stand_in("sklearn.cluster", KMeans=_unused("sklearn.cluster.KMeans"))
    _stand_in("toml")
    _stand_in("loguru", logger=logging.getLogger("loguru"))
    utils = _bare_package("utils", repo / "utils")
    utils.timeit = importlib.import_module("utils.tools").timeit
    _bare_package("prune", repo / "prune")
    sys.modules["prune.pruner_zero"] = types.ModuleType("prune.pruner_zero")
    sys.modules["prune.pruner_zero"].PrunerZero = _unused("PrunerZero")
    authors = importlib.import_module("prune.prune_llama")

    model.seq_len = model.seqlen
    ns = argparse.Namespace(
        device="cpu",
        nsamples=len(calib),
        seq_len=model.seq_len,
        d2_sparsegpt=True,
        d2_wanda=True,
        auto_s=False,
        kmeans=False,
        dsm=None,
        free=False,
        seed=0,
        logger=logging.getLogger("d2prune"),
        **args,
    )
    cls = authors.D2Prune_LLAMA
    find = _only_targets(vars(cls)["find_layers"].__func__, names)
    with _no_cuda_sync(), _patched(cls, find_layers=classmethod(find)):
        cls(ns, model).prune_llm(_loader(calib))


def check_repo(repo: Path, method: str) -> None:
    """Stops with one line unless ``repo`` is a checkout of ``method``'s repository."""
    if not (repo / MARKERS[method]).is_file():
        raise SystemExit(f"{repo} has no {MARKERS[method]}: pass a checkout of the {method} code.")


def prune(model, repo: Path, cfg: dict, calib: np.ndarray, names: set[str]) -> list[str]:
    """Prunes ``model`` in place with the authors' code of ``cfg["method"]`` from ``repo``.

    Args:
      model: a transformers ``LlamaForCausalLM`` on the CPU, with ``seqlen`` and
        ``hf_device_map`` set.
      repo: a checkout of the method's repository.
      cfg: the run's flat settings.
      calib: the calibration windows ``(N, T)``.
      names: the module names (``self_attn.q_proj``, ...) to prune in every layer.

    Returns:
      The notes of :func:`authors_arguments`.
    """
    method = cfg["method"]
    check_repo(repo, method)
    args, notes = authors_arguments(cfg, len(calib))
    sys.path.insert(0, str(repo))
    if method == "d2prune":
        _d2prune(model, args, calib, names, repo)
    else:
        {"wanda": _wanda, "sparsegpt": _sparsegpt, "admm": _admm, "alps": _alps}[method](
            model, args, calib, names
        )
    return notes
