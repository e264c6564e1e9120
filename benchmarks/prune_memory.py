"""Peak host memory and time of ``jaxprune prune`` streaming (one layer at a time from disk)
against in memory, on a random-weight Llama of TinyLlama-1.1B's shape.

Writes the model once as bfloat16 safetensors shards (about 2.2 GB: 22 layers, hidden 2048, 32
query and 4 key/value heads, MLP 5632, vocabulary 32000) with a word-level tokenizer and a small
C4 file, into ``--dir`` (reused when present). Then each run is ``jaxprune prune`` in a fresh
process (``qk`` 50% unstructured, small calibration, no evaluation, no saved parameters), which
reports its peak resident memory (``VmHWM`` of ``/proc/self/status``) on exit. The table sets
each peak against the model's bytes on disk (bfloat16) and in float32 (what a run computes in).

    python benchmarks/prune_memory.py [--dir /tmp/jaxprune-prune-memory] [--methods wanda softmax]
        [--calib 2 256] [--softmax-steps 5] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxprune import data
from jaxprune.models.llama import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
# TinyLlama-1.1B's shape (its config.json), random weights.
CONFIG = LlamaConfig(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_layers=22,
    num_heads=32,
    num_kv_heads=4,
    head_dim=64,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
# Layers per safetensors shard (about 180 MB of bfloat16 each).
LAYERS_PER_SHARD = 2
# Runs the command line, then prints the process's peak resident memory as one JSON line.
CHILD = """
import json, sys
from jaxprune.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read().split("\\n")
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": peak}), file=sys.stderr)
sys.exit(code)
"""


def layer_tensors(i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = CONFIG
    d, f, q, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    )
    shapes = {
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }
    out = {f"model.layers.{i}.{k}.weight": _normal(rng, s) for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = np.ones(d, ml_dtypes.bfloat16)
    return out


def _normal(rng: np.random.Generator, shape) -> np.ndarray:
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def write_model(folder: Path) -> int:
    """Writes the random model (shards, index, config, tokenizer) unless it is there; returns
    its bytes on disk."""
    import safetensors.numpy
    from tokenizers import Tokenizer, models, pre_tokenizers

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        c = CONFIG
        groups = [
            list(range(s, min(s + LAYERS_PER_SHARD, c.num_layers)))
            for s in range(0, c.num_layers, LAYERS_PER_SHARD)
        ]
        n = len(groups) + 1
        weight_map, total = {}, 0
        for k, group in enumerate([None, *groups]):
            if group is None:
                tensors = {
                    "model.embed_tokens.weight": _normal(rng, (c.vocab_size, c.hidden_size)),
                    "model.norm.weight": np.ones(c.hidden_size, ml_dtypes.bfloat16),
                    "lm_head.weight": _normal(rng, (c.vocab_size, c.hidden_size)),
                }
            else:
                tensors = {}
                for i in group:
                    tensors |= layer_tensors(i, rng)
            name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            safetensors.numpy.save_file(tensors, folder / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, name)
            total += sum(t.nbytes for t in tensors.values())
        hf = CONFIG.to_hf_config() | {"torch_dtype": "bfloat16"}
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        vocab = {f"w{i}": i for i in range(c.vocab_size - 1)} | {"[UNK]": c.vocab_size - 1}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(folder / "tokenizer.json"))
        # The index last: a folder with it is complete.
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index.write_text(json.dumps(body, indent=2) + "\n")
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def write_data(folder: Path) -> None:
    """A C4 file of random words (the calibration windows' source)."""
    path = folder / data.C4_FILES[2]
    if path.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for _ in range(1200):
            text = " ".join(f"w{i}" for i in rng.integers(0, CONFIG.vocab_size - 1, 96))
            f.write(json.dumps({"text": text}) + "\n")


def run(model: Path, data_dir: Path, out: Path, method: str, stream: bool, dtype: str, a) -> dict:
    argv = ["prune", "--model", str(model), "--data-dir", str(data_dir), "--out", str(out)]
    argv += ["--dtype", dtype]
    argv += ["--method", method, "--targets", "qk", "--sparsity", "0.5"]
    argv += ["--calibration.samples", str(a.calib[0]), "--calibration.seq-len", str(a.calib[1])]
    argv += ["--calibration.micro-batch", str(a.calib[0])]
    argv += ["--softmax.samples", str(a.calib[0]), "--softmax.seq-len", str(a.calib[1])]
    argv += ["--softmax.steps", str(a.softmax_steps), "--eval.data", "[]"]
    argv += ["--eval.heldout-samples", "0", "--save-params", "false", "--progress", "false"]
    argv += ["--stream", "true" if stream else "false", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{method} {dtype} stream={stream} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    peak = json.loads(done.stderr.strip().splitlines()[-1])["peak_rss_bytes"]
    return dict(metrics=metrics, peak=peak, wall=wall)


def available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo``."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(tempfile.gettempdir()) / "jaxprune-prune-memory"
    p.add_argument("--dir", type=Path, default=default, help="model, data and runs (reused)")
    p.add_argument("--methods", nargs="+", default=["wanda", "softmax"])
    p.add_argument("--calib", type=int, nargs=2, default=[2, 256], metavar=("N", "T"))
    p.add_argument("--softmax-steps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["stream", "memory"])
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="the runs' --dtype (the model's weights and activations)",
    )
    a = p.parse_args()

    model, data_dir = a.dir / "tinyllama-shape-random", a.dir / "data"
    t0 = time.perf_counter()
    disk = write_model(model)
    write_data(data_dir)
    params = disk // 2  # bfloat16
    f32 = 4 * params
    print(
        f"random Llama of TinyLlama-1.1B's shape: {params / 1e9:.2f} B parameters, "
        f"{disk / 2**30:.2f} GiB bfloat16 on disk, {f32 / 2**30:.2f} GiB in float32 "
        f"(written or found in {time.perf_counter() - t0:.0f} s)"
    )
    print(
        f"qk 50% unstructured; calibration {a.calib[0]} x {a.calib[1]} tokens; softmax "
        f"{a.softmax_steps} steps; no evaluation; each run a fresh process"
    )
    rows = []
    for dtype in a.dtypes:
        for method in a.methods:
            for mode in a.modes:
                # The in-memory load holds the bfloat16 tensors, their transposed copies and the
                # float32 model at once: about 2 x the float32 bytes. Refuse rather than crowd
                # out other processes of a shared machine.
                if mode == "memory" and available_bytes() < 2.2 * f32:
                    print(
                        f"  {method} {dtype} memory: skipped, {available_bytes() / 2**30:.1f} "
                        f"GiB available and the in-memory load needs about "
                        f"{2 * f32 / 2**30:.1f} GiB"
                    )
                    continue
                r = run(model, data_dir, a.dir / "runs", method, mode == "stream", dtype, a)
                rows.append((method, dtype, mode, r))
                print(f"  {method} {dtype} {mode}: done in {r['wall']:.0f} s", flush=True)
    print(
        f"{'method':<9}{'dtype':<10}{'mode':<8}{'peak RSS GiB':>13}{'/ disk':>8}{'/ f32':>7}"
        f"{'prune s':>9}{'wall s':>8}"
    )
    for method, dtype, mode, r in rows:
        print(
            f"{method:<9}{dtype:<10}{mode:<8}{r['peak'] / 2**30:>13.2f}{r['peak'] / disk:>8.2f}"
            f"{r['peak'] / f32:>7.2f}{r['metrics']['prune_seconds']:>9.1f}{r['wall']:>8.1f}"
        )


if __name__ == "__main__":
    main()
