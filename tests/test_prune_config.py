"""PruneConfig's sections: nested or dotted keys, dotted flags over a YAML file, old flat keys
refused with their new place, and stored flat configs still read (table reuse, --resume)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from jaxprune.config import ConfigError, from_dict, leaf_fields, load_yaml, replace, to_dict
from jaxprune.job import method_summary
from jaxprune.methods import registry
from jaxprune.prune_config import PruneConfig, flat_settings

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "experiments" / "results" / "full"
LEAVES = [key for key, *_ in leaf_fields(PruneConfig)]


def test_nested_and_dotted_keys_give_the_same_config():
    nested = from_dict(
        PruneConfig,
        {"method": "softmax", "softmax": {"lam": 0.03, "init": "ones"}, "eval": {"windows": 4}},
    )
    dotted = from_dict(
        PruneConfig,
        {"method": "softmax", "softmax.lam": 0.03, "softmax.init": "ones", "eval.windows": 4},
    )
    assert nested == dotted
    assert (nested.softmax.lam, nested.softmax.init, nested.eval.windows) == (0.03, "ones", 4)
    assert nested.softmax.steps == 80 and nested.calibration == PruneConfig().calibration
    # A later key wins, and a section given twice keeps the keys of both.
    mixed = from_dict(PruneConfig, {"softmax": {"lam": 0.5, "steps": 7}, "softmax.lam": 0.2})
    assert (mixed.softmax.lam, mixed.softmax.steps) == (0.2, 7)


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"lam": 0.03}, r"'lam' moved to 'softmax.lam'; write softmax.lam: 0.03"),
        ({"calib_samples": 8}, r"'calib_samples' moved to 'calibration.samples'"),
        ({"eval_data": ["c4"]}, r"'eval_data' moved to 'eval.data'; write eval.data: \[c4\]"),
        ({"blocksize": 64}, r"'blocksize' moved to 'sparsegpt.blocksize'"),
        ({"softmax": 3}, r"softmax=3 in config: expected a mapping"),
        ({"softmax": {"lam": -1}}, r"softmax.lam=-1.0 is out of range"),
        ({"model.name": "x"}, r"unknown key 'model.name'"),
    ],
)
def test_old_flat_keys_and_bad_sections_are_one_line(raw, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(PruneConfig, raw)
    assert "\n" not in str(info.value)


def test_every_moved_key_lands_on_a_field_and_every_old_field_moved():
    assert set(PruneConfig.MOVED_KEYS.values()) <= set(LEAVES)
    results = ROOT / "experiments" / "results"
    stored = [json.loads(p.read_text())["config"] for p in results.glob("*/runs/*/metrics.json")]
    stored += [
        row["config"] for p in results.glob("*/table.json") for row in json.loads(p.read_text())
    ]
    flat = [c for c in stored if "softmax" not in c]  # stored before the sections
    assert len(flat) >= 16 and all("lam" in c for c in flat)
    for config in stored:
        assert set(flat_settings(config)) <= set(LEAVES)


# Fields added after the sections: a flat config (written before them) cannot hold them, and a
# reader takes their defaults (resume.differences, table._same_settings).
ADDED_SINCE = {"softmax.mask", "softmax.stages", "softmax.batch"}


# Sections of the methods registered since (their keys are absent from old configs).
NEW_SECTIONS = {m.name for m in registry.methods() if m.section} - {"softmax", "sparsegpt"}


def without_added(settings: dict) -> dict:
    return {
        k: v
        for k, v in settings.items()
        if k not in ADDED_SINCE and k.split(".")[0] not in NEW_SECTIONS
    }


def old_flat(nested: dict) -> dict:
    """A nested config written as the code before the sections wrote it (flat keys)."""
    old_key = {new: old for old, new in PruneConfig.MOVED_KEYS.items()}
    flat = {k: v for k, v in nested.items() if not isinstance(v, dict)}
    for section in ("calibration", "eval", "softmax", "sparsegpt"):
        for key, value in nested[section].items():
            if f"{section}.{key}" in old_key:  # else a field added after the sections
                flat[old_key[f"{section}.{key}"]] = value
    return flat


def test_flat_settings_read_nested_flat_and_dotted_configs_alike():
    cfg = from_dict(PruneConfig, {"method": "softmax", "softmax": {"lam": 0.03}})
    nested = to_dict(cfg)
    assert nested["softmax"]["lam"] == 0.03 and "lam" not in nested
    flat = old_flat(nested)
    assert flat["lam"] == 0.03 and "softmax" not in flat
    assert without_added(flat_settings(flat)) == without_added(flat_settings(nested))
    # A key added since, whose default differs from what the old runs computed with, reads as
    # what they computed with.
    assert flat_settings(flat)["softmax.batch"] is None and nested["softmax"]["batch"] == 4
    assert flat_settings(flat_settings(nested)) == flat_settings(nested)
    assert flat_settings(nested)["softmax.lam"] == 0.03


def test_replace_changes_one_key_of_a_section_and_validates():
    cfg = from_dict(PruneConfig, {"softmax": {"lam": 0.03, "init": "ones"}})
    new = replace(cfg, method="softmax", softmax={"steps": 5})
    assert (new.method, new.softmax.steps, new.softmax.lam, new.softmax.init) == (
        "softmax",
        5,
        0.03,
        "ones",
    )
    assert replace(cfg, {"eval.windows": 3}).eval.windows == 3
    both = replace(cfg, {"eval": {"windows": 3, "batch": 2}}, eval={"data": ["c4"]})
    assert (both.eval.windows, both.eval.batch, both.eval.data) == (3, 2, ("c4",))
    with pytest.raises(ConfigError, match=r"softmax.steps=0 is out of range"):
        replace(cfg, softmax={"steps": 0})


def test_config_file_with_sections_under_dotted_flags(tmp_path):
    from jaxprune.commands import prune as prune_cmd

    path = tmp_path / "run.yaml"
    path.write_text("method: softmax\nsoftmax:\n  lam: 0.03\n  init: ones\neval.windows: 4\n")
    parser = argparse.ArgumentParser()
    prune_cmd.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--softmax.lam", "1e-1", "--eval.batch", "2"])
    cfg = prune_cmd.config_from_args(args)
    assert (cfg.softmax.lam, cfg.softmax.init) == (0.1, "ones")
    assert (cfg.eval.windows, cfg.eval.batch) == (4, 2)


def _table(**extra):
    from jaxprune.table import TableConfig

    raw = load_yaml(ROOT / "experiments" / "configs" / "table.yaml")
    raw.pop("experiment")
    return from_dict(TableConfig, {**raw, **extra})


def test_rows_merge_base_sections_key_by_key_and_name_moved_keys():
    table = _table(**{"base.softmax.steps": 10, "base.eval": {"windows": 2}})
    rows = table.row_configs()
    paper_start = rows["softmax (paper start) qk 50%"]
    assert (paper_start.softmax.init, paper_start.softmax.lam) == ("ones", 0.03)
    assert paper_start.softmax.steps == 10 and paper_start.eval.windows == 2
    assert rows["paper dense"].eval.data == ("c4-paper",) and rows["paper dense"].eval.windows == 2
    with pytest.raises(ValueError, match=r"row 'x': 'init' moved to 'softmax.init'"):
        from jaxprune.table import TableConfig

        from_dict(TableConfig, {"rows": [{"name": "x", "init": "ones"}]})


@pytest.mark.parametrize(
    "row,run_dir",
    [
        ("dense", "20261130-031618"),
        ("softmax qk 50% (no update)", "20261130-043543"),
        ("softmax qk 50% (output group)", "20261130-041301"),
    ],
)
def test_committed_flat_runs_are_reused_by_the_nested_rows(row, run_dir):
    from jaxprune.table import _reusable

    stored = json.loads((FULL / "runs" / run_dir / "metrics.json").read_text())["config"]
    assert "softmax" not in stored  # stored flat, before the sections
    cfg = _table().row_configs()[row]
    found = _reusable(FULL, cfg)
    assert found is not None and Path(found["run_dir"]).name == run_dir
    # Any other setting it reads, in a section or not, is another measurement.
    changed_softmax = _reusable(FULL, replace(cfg, softmax={"lam": 0.2}))
    if cfg.method == "softmax":
        assert changed_softmax is None
    else:  # only the softmax-aware method reads its section
        assert Path(changed_softmax["run_dir"]).name == run_dir
    assert _reusable(FULL, replace(cfg, eval={"windows": 8})) is None


def test_a_new_softmax_default_keeps_the_baseline_rows_and_finds_the_matching_softmax_row():
    """The default update became `softmax` after the baseline rows ran with `none` stored: they
    stay valid, and the default softmax row is the run that measured the update."""
    from jaxprune.table import _reusable

    rows = _table().row_configs()
    sparsegpt = _reusable(FULL, rows["sparsegpt qk 50%"])
    run_dir = FULL / "runs" / Path(sparsegpt["run_dir"]).name
    stored = json.loads((run_dir / "metrics.json").read_text())["config"]
    assert stored["update"] == "none" and rows["sparsegpt qk 50%"].softmax.update == "softmax"
    assert (
        Path(_reusable(FULL, rows["softmax qk 50% (4 sequences)"])["run_dir"]).name
        == "20261130-062343"
    )


def test_runs_from_before_the_batch_match_only_rows_without_one():
    """``softmax.batch`` came with a default of 4 (16 sequences, 4 per step): the runs stored
    before it used every sequence in every step, so they match the rows with ``batch: null``,
    never the default rows, although their configs lack the key."""
    from jaxprune.table import _reusable, _same_settings

    rows = _table().row_configs()
    every_step = _reusable(FULL, rows["softmax qk 50% (16 sequences per step)"])
    stored = json.loads(
        (FULL / "runs" / Path(every_step["run_dir"]).name / "metrics.json").read_text()
    )
    assert "batch" not in stored["config"]["softmax"]
    assert stored["config"]["softmax"]["samples"] == rows["softmax qk 50%"].softmax.samples
    assert not _same_settings(stored["config"], to_dict(rows["softmax qk 50%"]))
    default = _reusable(FULL, rows["softmax qk 50%"])
    assert default is not None and default["run_dir"] != every_step["run_dir"]
    assert default["config"]["softmax"]["batch"] == 4


def test_a_run_started_with_flat_settings_resumes_and_names_dotted_differences(tmp_path):
    from jaxprune import resume
    from jaxprune.errors import ResumeError

    # batch null: what every run stored before softmax.batch existed computed with.
    cfg = from_dict(PruneConfig, {"method": "softmax", "softmax.lam": 0.03, "softmax.batch": None})
    nested = to_dict(cfg)
    flat = old_flat(nested)
    assert resume.fingerprint(flat) == without_added(resume.fingerprint(nested)) | {
        "softmax.batch": None
    }
    assert resume.fingerprint(resume.fingerprint(nested)) == resume.fingerprint(nested)
    resume.write_run_file(tmp_path, flat, "jaxprune prune --method softmax --lam 0.03")
    defaults = to_dict(PruneConfig())
    assert resume.check_resumable(tmp_path, nested, defaults) == tmp_path
    other = to_dict(replace(cfg, softmax={"lam": 0.1}))
    with pytest.raises(ResumeError, match=r"\(softmax.lam: 0.03 there, 0.1 now\)"):
        resume.check_resumable(tmp_path, other, defaults)
    # Today's default batch computes otherwise than the stored run did: refused, named.
    batched = to_dict(replace(cfg, softmax={"batch": 4}))
    with pytest.raises(ResumeError, match=r"softmax.batch: None there, 4 now"):
        resume.check_resumable(tmp_path, batched, defaults)


@pytest.mark.parametrize(
    "pattern,update,mask",
    [
        ("unstructured", "softmax", "solve"),
        ("2:4", "softmax", "alps"),
        ("2:4", "none", "solve"),
    ],
)
def test_auto_mask_resolves_to_the_best_measured_and_follows_a_changed_pattern(
    pattern, update, mask
):
    """softmax.mask=auto is ALPS's mask at N:M with the softmax update (the best 2:4 row),
    the solved mask otherwise. It stays auto in the config, so changing the pattern of a config
    changes the mask too, while an explicit mask stays."""

    def source(cfg):
        return method_summary(cfg)["softmax_mask"]

    cfg = replace(PruneConfig(), method="softmax", pattern=pattern, softmax={"update": update})
    assert cfg.softmax.mask == "auto" and source(cfg) == mask
    assert source(replace(cfg, pattern="unstructured")) == "solve"
    pinned = replace(cfg, softmax={"mask": "solve"})
    assert source(replace(pinned, pattern="2:4")) == "solve"


def test_each_2_4_row_reuses_the_run_of_its_own_mask_source():
    """The default 2:4 row is the ALPS-mask run; the runs of the earlier defaults (SparseGPT's
    mask, and the solved mask, which recorded ``auto``) keep their own rows, because a stored
    ``auto`` counts as the source its run recorded, not as today's rule."""
    from jaxprune.table import _reusable

    rows = _table().row_configs()
    found = {
        name: _reusable(FULL, rows[name])
        for name in (
            "softmax qk 2:4 (4 sequences)",
            "softmax qk 2:4 (SparseGPT mask + softmax update)",
            "softmax qk 2:4 (solved mask)",
        )
    }
    sources = [
        m.get("softmax_mask", flat_settings(m["config"]).get("softmax.mask", "solve"))
        for m in found.values()
    ]
    assert sources == ["alps", "sparsegpt", "solve"]
    assert len({m["run_dir"] for m in found.values()}) == 3


def test_a_stored_auto_run_counts_as_the_mask_it_recorded():
    from jaxprune.table import _same_settings

    cfg = replace(PruneConfig(), method="softmax", pattern="2:4")
    stored = to_dict(cfg)  # softmax.mask: auto, which resolves to alps today
    assert _same_settings(stored, to_dict(cfg), "alps")
    assert not _same_settings(stored, to_dict(cfg), "sparsegpt")
    pinned = to_dict(replace(cfg, softmax={"mask": "sparsegpt"}))
    assert _same_settings(stored, pinned, "sparsegpt")


def test_the_ablation_table_pairs_each_change_with_its_row_without_it():
    from jaxprune.compare import format_difference, paired_bootstrap
    from jaxprune.table import _reusable, ablation_table

    table = _table()
    configs = table.row_configs()
    rows = [
        {"name": name, **found}
        for name in ("softmax qk 50%", "softmax qk 50% (no update)")
        if (found := _reusable(FULL, configs[name])) is not None
    ]
    assert len(rows) == 2
    ablations = [
        {"change": "update", "row": "softmax qk 50%", "against": "softmax qk 50% (no update)"},
        {"change": "term", "row": "softmax qk 50% (1024-token term)", "against": "softmax qk 50%"},
    ]
    text = ablation_table(rows, ablations, ["wikitext2", "c4", "c4-paper"])
    update, pending = text.splitlines()[-2:]
    for d in ("wikitext2", "c4"):
        expected = paired_bootstrap(rows[0]["evaluation"][d], rows[1]["evaluation"][d])
        assert format_difference(expected) in update
    assert "c4-paper" not in text  # no ablation's row evaluated it
    assert pending.count("not yet measured") == 2
    with pytest.raises(ValueError, match="against 'nope' names no row"):
        _table(ablations=[{"change": "x", "row": "softmax qk 50%", "against": "nope"}])
    with pytest.raises(ValueError, match="give exactly change, row and against"):
        _table(ablations=[{"change": "x", "on": "softmax qk 50%"}])


def test_a_table_with_no_measured_row_says_so(tmp_path):
    from jaxprune.table import summary

    text = summary({"rows": [], "out": str(tmp_path), "files": ["table.md"]})
    assert "No row of this table is measured yet" in text and "run_missing=false" in text


def test_a_row_depends_only_on_the_sections_of_the_methods_it_runs():
    """A change to another method's defaults, or a progress bar, leaves a stored row reusable;
    a change to the row's own method's section, or to the section of the method it hands the
    other matrices to, does not."""
    from jaxprune.table import _same_settings

    def stored(**changes):
        return to_dict(replace(PruneConfig(), **changes))

    wanda = stored(method="wanda", progress=False, admm={"rho": 2.0}, softmax={"lam": 0.5})
    assert _same_settings(wanda, to_dict(replace(PruneConfig(), method="wanda")))
    admm = stored(method="admm", admm={"rho": 2.0})
    assert not _same_settings(admm, to_dict(replace(PruneConfig(), method="admm")))
    to_sparsegpt = {
        "method": "softmax",
        "targets": "attn",
        "softmax": {"other_method": "sparsegpt"},
    }
    softmax = stored(**to_sparsegpt, sparsegpt={"blocksize": 64})
    assert not _same_settings(softmax, to_dict(replace(PruneConfig(), **to_sparsegpt)))
    handed = stored(
        method="softmax",
        targets="attn",
        softmax={"other_method": "wanda"},
        sparsegpt={"blocksize": 64},
    )
    to_wanda = replace(
        PruneConfig(), method="softmax", targets="attn", softmax={"other_method": "wanda"}
    )
    assert _same_settings(handed, to_dict(to_wanda))
    # At qk nothing is handed on: the other method and its section never run.
    qk_only = stored(
        method="softmax", softmax={"other_method": "sparsegpt"}, sparsegpt={"blocksize": 64}
    )
    assert _same_settings(qk_only, to_dict(replace(PruneConfig(), method="softmax")))
    # A start from another method's mask runs that method.
    start = {"method": "softmax", "softmax": {"mask": "sparsegpt"}}
    from_sparsegpt = stored(**start, sparsegpt={"blocksize": 64})
    assert not _same_settings(from_sparsegpt, to_dict(replace(PruneConfig(), **start)))


def test_the_committed_magnitude_2_4_row_is_the_first_tie_rule_and_torch_cpu_is_another_row():
    """The row ran before ``magnitude.ties`` existed, with the rule that is now its default."""
    from jaxprune.table import _reusable

    cfg = _table().row_configs()["magnitude qk 2:4"]
    found = _reusable(FULL, cfg)
    assert found is not None and cfg.magnitude.ties == "first"
    stored = json.loads((FULL / "runs" / Path(found["run_dir"]).name / "metrics.json").read_text())
    assert "ties" not in stored["config"].get("magnitude", {})
    # The torch-cpu row is its own run (measured, or still to measure), never the first-tie run.
    other = _reusable(FULL, replace(cfg, magnitude={"ties": "torch-cpu"}))
    assert other is None or other["run_dir"] != found["run_dir"]
    if other is not None:
        run = FULL / "runs" / Path(other["run_dir"]).name / "metrics.json"
        assert json.loads(run.read_text())["config"]["magnitude"]["ties"] == "torch-cpu"
    with pytest.raises(ConfigError, match=r"magnitude.ties='last' is not allowed"):
        replace(cfg, magnitude={"ties": "last"})


def test_the_d2prune_run_at_128_sequences_is_not_the_row_of_the_new_default():
    """The committed D2Prune run evaluated the authors' accumulators at 128 sequences on 32
    windows; the default now follows the windows, so the row must be measured again, and the
    old run stays the row of its explicit setting."""
    from jaxprune.table import _reusable

    cfg = _table().row_configs()["d2prune qk 50%"]
    assert cfg.d2prune.sequences is None
    rerun = _reusable(FULL, cfg)
    assert rerun is None or Path(rerun["run_dir"]).name != "20261206-151155-2"
    found = _reusable(FULL, replace(cfg, d2prune={"sequences": 128}))
    assert found is not None and Path(found["run_dir"]).name == "20261206-151155-2"


def test_bfloat16_rows_are_their_own_measurements_and_the_float32_rows_stay():
    """Runs stored before ``dtype`` existed ran in float32: they stay the float32 rows, and never
    stand for a bfloat16 row."""
    from jaxprune.table import _reusable

    rows = _table().row_configs()
    assert rows["dense (bfloat16)"].dtype == "bfloat16" and rows["dense"].dtype == "float32"
    dense = _reusable(FULL, rows["dense"])
    assert dense is not None and "dtype" not in dense["config"]
    for name in ("dense (bfloat16)", "sparsegpt qk 50% (bfloat16)", "softmax qk 50% (bfloat16)"):
        found = _reusable(FULL, rows[name])
        assert found is None or found["config"]["dtype"] == "bfloat16"
