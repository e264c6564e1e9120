"""`jaxprune prune` end to end on the default model, with tiny settings: metrics, orbax outputs,
the Hugging Face export. Slow: needs the cached default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxprune.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, default_model_path):
    tmp = tmp_path_factory.mktemp("prune")
    argv = [
        "prune",
        "--method",
        "wanda",
        "--targets",
        "qk",
        "--pattern",
        "2:4",
        "--calibration.samples",
        "2",
        "--calibration.seq-len",
        "64",
        "--eval.windows",
        "1",
        "--eval.seq-len",
        "64",
        "--eval.data",
        "[wikitext2]",
        "--layers",
        "[0, 1]",
        "--eval.heldout-samples",
        "1",
        "--softmax.seq-len",
        "32",
        "--out",
        str(tmp / "runs"),
        "--json",
        "--export-hf",
        str(tmp / "hf"),
        "--progress",
        "false",
    ]
    return tmp, argv


def test_prune_writes_metrics_masks_params_and_a_loadable_hf_folder(pruned_run, capsys):
    tmp, argv = pruned_run
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = Path(printed["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["pattern"] == "2:4" and metrics["config"]["method"] == "wanda"
    assert set(metrics["measured_sparsity"]) == {"0.q", "0.k", "1.q", "1.k"}
    assert all(v == 0.5 for v in metrics["measured_sparsity"].values())
    assert np.isfinite(metrics["perplexity"]["wikitext2"]) and metrics["prune_seconds"] > 0
    assert metrics["host_peak_rss_bytes"] > 0 and "jaxprune prune" in metrics["command"]

    masks = ocp.StandardCheckpointer().restore((run_dir / "masks").absolute())
    assert np.asarray(masks["0"]["q"]).dtype == bool
    assert (np.asarray(masks["1"]["k"]).reshape(-1, 4, 192).sum(axis=1) == 2).all()

    import torch
    import transformers

    from jaxprune.loaders.resolve import load_model
    from jaxprune.models.llama import make_forward

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp / "hf").eval()
    q = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q.T == 0, ~np.asarray(masks["0"]["q"]) | (q.T == 0))
    ours, tokenizer = load_model(str(tmp / "hf"))
    ids = np.asarray(tokenizer.encode("The pruned model still reads text.").ids)[None]
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(make_forward(ours)(ids)), ref, atol=2e-3, rtol=1e-3)


def test_prune_refuses_a_bad_flag_with_one_line(capsys):
    assert main(["prune", "--sparsity", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sparsity=1.5 is out of range" in err and "\n" not in err


def test_table_compares_rows_paired_and_lists_rows_not_yet_measured(pruned_run):
    from jaxprune.config import from_dict
    from jaxprune.table import TableConfig, run

    tmp, _ = pruned_run
    base = {
        "calibration": {"samples": 2, "seq_len": 64},
        "eval": {"windows": 3, "seq_len": 64, "data": ["wikitext2"], "heldout_samples": 1},
        "softmax.seq_len": 32,
        "layers": [0, 1],
        "save_params": False,
        "progress": False,
    }
    rows = [
        {"name": "dense", "method": "dense"},
        {"name": "wanda", "method": "wanda", "reference": "dense"},
        {"name": "magnitude", "method": "magnitude", "reference": "wanda"},
    ]
    out = str(tmp / "table")
    first = from_dict(TableConfig, {"base": base, "rows": rows[:2], "out": out})
    result = run(first)
    wanda = result["rows"][1]
    ev = wanda["evaluation"]["wikitext2"]
    assert len(ev["window_nll"]) == len(ev["window_tokens"]) == 3
    cmp = wanda["comparison"]["wikitext2"]
    ppl = wanda["perplexity"]["wikitext2"] - result["rows"][0]["perplexity"]["wikitext2"]
    assert cmp["difference"] == pytest.approx(ppl, rel=1e-9)
    assert cmp["low"] <= cmp["difference"] <= cmp["high"]
    # A row not measured yet is listed as such, never estimated, when the table only collects.
    listing = from_dict(TableConfig, {"base": base, "rows": rows, "out": out, "run_missing": False})
    run(listing)
    text = (Path(out) / "table.md").read_text()
    assert "wikitext2 Δ vs ref [95% CI]" in text and "[" in text.split("| wanda |")[1]
    assert "- magnitude: not yet measured (`jaxprune prune --method magnitude" in text
