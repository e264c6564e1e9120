"""The authors' check: their own pruning code against one of our runs.

Runs the pruning code of the authors' repository, unchanged, on the same model (our loaded
weights written as a transformers folder), the same calibration windows and the same targets as
a finished jaxprune run, evaluates the result in PyTorch on the run's own windows, and prints
both perplexities, their ratio and the paired bootstrap interval of the difference
(:func:`jaxprune.compare.paired_bootstrap`), and how often our saved masks and the authors'
nonzeros agree, per layer (layer 0 sees the same inputs in both runs, so it compares the rules;
later layers also carry the earlier layers' differences). Methods and repositories: ``wanda``
(locuslab/wanda), ``sparsegpt`` (IST-DASLab/sparsegpt), ``admm`` (fmfi-compbio/admm-pruning),
``alps`` (mazumder-lab/ALPS), ``d2prune`` (cquxl/D2Prune).

    git clone https://github.com/fmfi-compbio/admm-pruning /tmp/admm-pruning
    python benchmarks/authors_check.py experiments/results/full/runs/<admm run> \
        --repo /tmp/admm-pruning > result.txt

The authors' progress prints go to stderr, so stdout holds the check's lines only.

How each repository is called, with which arguments, and every adaptation (all outside the
authors' functions) are in :mod:`authors_adapters`. This script adds one: transformers >= 4.48
decoder layers need the rotary ``position_embeddings`` that the authors' layer-by-layer calls do
not pass, so a wrapper computes them from the positions, as the model does; the script first
checks on a real window that these layer-by-layer calls reproduce the model's own hidden states.
A run whose settings the authors' code does not have (another comparison group, non-default
options that their code hard-codes, the paper protocol, some layers only) is refused before the
model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from authors_adapters import MARKERS, MODULES, authors_arguments, check_repo, prune

from jaxprune import data
from jaxprune.compare import paired_bootstrap
from jaxprune.prune_config import TARGETS, flat_settings


def _load_run(run_dir: Path) -> tuple[dict, dict]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the folder of a finished jaxprune run.")
    metrics = json.loads(path.read_text())
    cfg = flat_settings(metrics["config"])
    if cfg["method"] not in MARKERS:
        raise SystemExit(f"{run_dir} is a {cfg['method']!r} run: pass one of {sorted(MARKERS)}.")
    cfg["group"] = metrics.get("group") or cfg.get("group")
    try:
        authors_arguments(cfg, cfg["calibration.samples"] or 32)
    except ValueError as err:
        raise SystemExit(f"{run_dir}: {err}") from None
    return metrics, cfg


def _position_wrapper(forward, rotary):
    """A decoder-layer forward that computes the rotary embeddings when the caller passes none
    (the authors' scripts were written for transformers < 4.48, where layers did it)."""
    import torch

    def wrapped(self, hidden_states, *args, position_ids=None, position_embeddings=None, **kw):
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1])[None]
            position_embeddings = rotary(hidden_states, position_ids)
        return forward(
            self,
            hidden_states,
            *args,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kw,
        )

    return wrapped


def _check_layer_calls(model, window, n_tokens: int = 256) -> float:
    """Largest relative gap between the model's hidden states and the authors' calling
    convention (``layer(x[None], attention_mask=..., position_ids=...)[0]``), all but the last
    layer (whose output transformers reports after the final norm)."""
    import torch

    ids = torch.tensor(window[None, :n_tokens], dtype=torch.long)
    layers = model.model.layers
    seen = {}  # what the authors' Catcher records: the kwargs the model gives layer 0

    def record(_, args, kwargs):
        seen.update(attention_mask=kwargs["attention_mask"], position_ids=kwargs["position_ids"])

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        handle.remove()
        x = states[0][0]
        worst = 0.0
        for i in range(len(layers) - 1):
            x = layers[i](x[None], **seen)[0]
            ref = states[i + 1][0]
            worst = max(worst, float((x - ref).norm() / ref.norm()))
    return worst


def _torch_model(ours):
    import torch
    import transformers

    from jaxprune.loaders.hf import write_hf_folder

    with tempfile.TemporaryDirectory() as tmp:
        write_hf_folder(ours, tmp)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    model.hf_device_map = {}  # the authors' loops look devices up in it
    return model


def _mask_agreement(run_dir: Path, model, targets) -> dict[int, float]:
    """Per layer, the fraction of the targets' entries where our run's saved keep-mask and the
    authors' nonzeros agree (empty where the run saved no masks). Layer 0 sees the same inputs
    in both runs, so it tells the rules apart; later layers also carry earlier differences."""
    path = (run_dir / "masks").absolute()
    if not path.is_dir():
        return {}
    import orbax.checkpoint as ocp

    ours = ocp.StandardCheckpointer().restore(path)
    agreement = {}
    for i, layer in enumerate(model.model.layers):
        masks = ours.get(str(i), {})
        same = total = 0
        for t in targets:
            if t in masks:
                theirs = layer.get_submodule(MODULES[t]).weight.detach().numpy().T != 0
                same += int((theirs == masks[t]).sum())
                total += theirs.size
        if total:
            agreement[i] = same / total
    return agreement


def _window_nll(model, windows: np.ndarray) -> tuple[list[float], list[int]]:
    import torch

    nll, tokens = [], []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor(w[None], dtype=torch.long)
            logits = model(ids).logits[0, :-1].double()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            nll.append(float(loss))
            tokens.append(len(w) - 1)
    return nll, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help=f"a finished jaxprune run of {', '.join(MARKERS)}")
    p.add_argument("--repo", type=Path, required=True, help="checkout of the authors' repository")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    a = p.parse_args()

    metrics, cfg = _load_run(a.run)
    method = cfg["method"]
    check_repo(a.repo, method)

    from jaxprune.loaders.resolve import load_model

    ours, tokenizer = load_model(cfg["model"])
    model = _torch_model(ours)
    del ours
    seq_len = model.seqlen = cfg["calibration.seq_len"]
    calib = data.calibration_windows(
        tokenizer, "standard", cfg["calibration.samples"], seq_len, cfg["data_dir"]
    )
    # transformers' decoder layers get the rotary tables from the model; the authors' loops
    # call the layers directly.
    layer_cls = type(model.model.layers[0])
    layer_cls.forward = _position_wrapper(layer_cls.forward, model.model.rotary_emb)
    gap = _check_layer_calls(model, calib[0])
    print(f"layer-by-layer calls against the model's hidden states: max relative gap {gap:.1e}")
    if gap > 1e-4:
        raise SystemExit("the authors' layer calls do not reproduce the model; stopping.")

    names = {MODULES[t] for t in TARGETS[cfg["targets"]]}
    t = time.perf_counter()
    # The authors' progress prints go to stderr, so that stdout holds the check's lines only.
    with contextlib.redirect_stdout(sys.stderr):
        notes = prune(model, a.repo, cfg, calib, names)
    prune_s = time.perf_counter() - t
    n_layers = len(model.model.layers)
    print(
        f"authors' {method} on {cfg['targets']} at {cfg['pattern']}: {prune_s:.0f} s "
        f"({prune_s / n_layers:.1f} s per layer; ours: {metrics['prune_seconds']:.0f} s)"
    )
    for note in notes:
        print(f"note: {note}")
    agreement = _mask_agreement(a.run, model, TARGETS[cfg["targets"]])
    if agreement:
        worst = min(agreement, key=agreement.get)
        mean = sum(agreement.values()) / len(agreement)
        print(
            f"masks, ours against the authors' nonzeros: {100 * mean:.2f}% of entries agree "
            f"(layer 0: {100 * agreement.get(0, math.nan):.2f}%, lowest: layer {worst} "
            f"{100 * agreement[worst]:.2f}%)"
        )

    result = {"run": str(a.run), "method": method, "targets": cfg["targets"]}
    result |= {"pattern": cfg["pattern"], "prune_seconds": prune_s, "notes": notes}
    result |= {"mask_agreement": agreement, "sets": {}}
    for name in cfg["eval.data"]:
        windows = data.eval_windows(
            tokenizer, name, cfg["eval.windows"], cfg["eval.seq_len"], cfg["data_dir"]
        )
        nll, tokens = _window_nll(model, windows)
        theirs = {"window_nll": nll, "window_tokens": tokens}
        ours_eval = metrics["evaluation"][name]
        ppl_theirs = math.exp(sum(nll) / sum(tokens))
        cmp = paired_bootstrap(ours_eval, theirs)
        ratio = ours_eval["perplexity"] / ppl_theirs
        result["sets"][name] = {
            "ours": ours_eval["perplexity"],
            "authors": ppl_theirs,
            "ratio": ratio,
            "difference": cmp,
        }
        print(
            f"{name} ({len(windows)} windows of {cfg['eval.seq_len']}): ours "
            f"{ours_eval['perplexity']:.3f}, authors' code {ppl_theirs:.3f}, ours / authors "
            f"{ratio:.4f} ({100 * (ratio - 1):+.2f}%), ours - authors {cmp['difference']:+.3f} "
            f"[{cmp['low']:+.3f}, {cmp['high']:+.3f}]"
        )
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
