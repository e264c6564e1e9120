"""The authors' check: their own Wanda or SparseGPT code against one of our runs.

Runs the pruning function of the authors' repository, unchanged, on the same model (our loaded
weights written as a transformers folder), the same calibration windows and the same targets as
a committed jaxprune run, evaluates the result in PyTorch on the run's own windows, and prints
both perplexities, their ratio and the paired bootstrap interval of the difference
(:func:`jaxprune.compare.paired_bootstrap`).

    git clone https://github.com/locuslab/wanda /tmp/wanda
    git clone https://github.com/IST-DASLab/sparsegpt /tmp/sparsegpt
    python benchmarks/authors_check.py experiments/results/full/runs/<wanda run> --repo /tmp/wanda
    python benchmarks/authors_check.py experiments/results/full/runs/<sparsegpt run> \
        --repo /tmp/sparsegpt

What is adapted, and only outside the authors' functions:
- their data loaders (which download from the hub) return our calibration windows;
- their ``find_layers`` lists only the run's targets (``qk``, ``attn`` or ``all``);
- transformers >= 4.48 decoder layers need the rotary ``position_embeddings`` that the authors'
  layer-by-layer calls do not pass: a wrapper computes them from the positions, as the model
  does. The script first checks on a real window that these layer-by-layer calls reproduce the
  model's own hidden states;
- ``torch.cuda.synchronize`` is a no-op on a CPU-only torch.
The authors' defaults are kept: Wanda per-output rows (``use_variant`` off), SparseGPT
``blocksize`` 128, ``percdamp`` 0.01, all targets of a layer from its dense inputs (no
``--true-sequential``), as in their README's commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from jaxprune import data
from jaxprune.compare import paired_bootstrap
from jaxprune.prune_config import METHOD_GROUPS, TARGETS, flat_settings

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


def _load_run(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the folder of a finished jaxprune run.")
    metrics = json.loads(path.read_text())
    cfg = flat_settings(metrics["config"])
    method = cfg["method"]
    if method not in ("wanda", "sparsegpt"):
        raise SystemExit(f"{run_dir} is a {method!r} run: pass a wanda or sparsegpt run.")
    group = metrics.get("group") or cfg.get("group") or METHOD_GROUPS[method][0]
    if group != METHOD_GROUPS[method][0]:
        raise SystemExit(
            f"{run_dir} used group={group!r}; the authors' code has only its own grouping "
            f"({METHOD_GROUPS[method][0]!r}): pass a run with the default group."
        )
    if cfg["calibration.protocol"] != "standard":
        raise SystemExit("only standard-protocol runs are supported (fixed-length windows).")
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


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k, None) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _only_targets(find_layers, names):
    def find(module, *args, **kwargs):
        found = find_layers(module, *args, **kwargs)
        return {n: m for n, m in found.items() if n in names}

    return find


def _prune_with_authors(model, repo: Path, method: str, cfg: dict, calib: np.ndarray) -> None:
    import torch

    names = {MODULES[t] for t in TARGETS[cfg["targets"]]}
    n, m = (0, 0)
    if cfg["pattern"] != "unstructured":
        n, m = (int(v) for v in cfg["pattern"].split(":"))
    loader = [(torch.tensor(w[None], dtype=torch.long), None) for w in calib]
    sys.path.insert(0, str(repo))
    # Their data modules import `datasets` at the top; nothing of it is used here, so a stand-in
    # serves where it is not installed.
    if importlib.util.find_spec("datasets") is None:
        stub = sys.modules.setdefault("datasets", types.ModuleType("datasets"))
        stub.load_dataset = None
    with _patched(torch.cuda, synchronize=lambda *a, **k: None):
        if method == "wanda":
            import lib.prune as authors

            args = argparse.Namespace(
                nsamples=len(calib), seed=0, sparsity_ratio=cfg["sparsity"], use_variant=False
            )
            with _patched(
                authors,
                get_loaders=lambda *a, **k: (loader, None),
                find_layers=_only_targets(authors.find_layers, names),
            ):
                authors.prune_wanda(args, model, None, torch.device("cpu"), n, m)
        else:
            import llama as authors

            args = argparse.Namespace(
                nsamples=len(calib),
                sparsity=cfg["sparsity"],
                prunen=n,
                prunem=m,
                percdamp=cfg.get("sparsegpt.percdamp", 0.01),
                blocksize=cfg.get("sparsegpt.blocksize", 128),
                true_sequential=False,
                minlayer=-1,
                maxlayer=1000,
                prune_only="",
                invert=False,
                wbits=16,
                gmp=False,
            )
            with _patched(
                authors, args=args, find_layers=_only_targets(authors.find_layers, names)
            ):
                authors.llama_sequential(model, loader, torch.device("cpu"))


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
    p.add_argument("run", type=Path, help="a finished jaxprune wanda or sparsegpt run folder")
    p.add_argument("--repo", type=Path, required=True, help="checkout of the authors' repository")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    a = p.parse_args()

    metrics, cfg = _load_run(a.run)
    method = cfg["method"]
    expected = "lib/prune.py" if method == "wanda" else "llama.py"
    if not (a.repo / expected).is_file():
        raise SystemExit(f"{a.repo} has no {expected}: pass a checkout of the {method} repository.")

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

    t = time.perf_counter()
    _prune_with_authors(model, a.repo, method, cfg, calib)
    prune_s = time.perf_counter() - t
    print(f"authors' {method} on {cfg['targets']} at {cfg['pattern']}: {prune_s:.0f} s")

    result = {"run": str(a.run), "method": method, "targets": cfg["targets"]}
    result |= {"pattern": cfg["pattern"], "prune_seconds": prune_s, "sets": {}}
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
