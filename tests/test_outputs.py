"""A full disk or Ctrl-C while a run saves its results: one line naming the folder, the bytes and
the fix (exit status 2, or 130 for Ctrl-C); nothing half-written left under a final name or hidden
beside it; earlier results untouched; and ``--resume RUN_DIR`` finishes the run, reusing what was
complete. Subprocesses on a tiny random model (``tests/tiny_run.py``); the cases on a real full
disk mount a small tmpfs and are skipped where that is not allowed (not root)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import TINY_FLAGS, jaxprune, snapshot, write_tiny_data, write_tiny_model

# Runs the command line after PATCH (Python source), as a `python -c` script.
PATCHED = """
import errno, os, signal, sys, time
from pathlib import Path
{patch}
from jaxprune.cli import main
sys.exit(main(sys.argv[1:]))
"""
ENOSPC = "OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str({}))"
# Orbax's save of params/ leaves a partial temporary folder, then the disk is full.
ORBAX_FULL = f"""
import orbax.checkpoint as ocp
save = ocp.StandardCheckpointer.save
def full_for_params(self, directory, *args, **kwargs):
    if Path(directory).name != "params":
        return save(self, directory, *args, **kwargs)
    tmp = Path(str(directory) + ".orbax-checkpoint-tmp-123")
    tmp.mkdir()
    (tmp / "chunk").write_bytes(bytes(4096))
    raise {ENOSPC.format("tmp / 'chunk'")}
ocp.StandardCheckpointer.save = full_for_params
"""
# The export's weights file is half written, then the disk is full (or Ctrl-C is pressed).
EXPORT_STOPS = """
import safetensors.numpy
def stop(tensors, filename, metadata=None):
    Path(filename).write_bytes(bytes(50_000))
    {stop}
safetensors.numpy.save_file = stop
"""
EXPORT_FULL = EXPORT_STOPS.format(stop="raise " + ENOSPC.format("filename"))
# (Python raises KeyboardInterrupt in the main thread at its next check, whichever thread the
# signal reached: so wait in short sleeps, not in signal.pause().)
# Ctrl-C as a terminal delivers it: Python's own handler, even where the test runner's process was
# started with SIGINT ignored (a background job of a shell without job control passes that on).
EXPORT_CTRL_C = "signal.signal(signal.SIGINT, signal.default_int_handler)\n" + EXPORT_STOPS.format(
    stop="os.kill(os.getpid(), signal.SIGINT)\n    while True: time.sleep(0.01)"
)
# The disk has 1,000 bytes free.
DISK_NEARLY_FULL = """
import shutil
shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
"""

EARLIER_RUN = "20000101-000000"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and data, an earlier run and an earlier export that no failure may touch."""
    root = tmp_path_factory.mktemp("outputs")
    write_tiny_model(root / "model")
    write_tiny_data(root / "data")
    earlier = root / "runs" / EARLIER_RUN
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"config": {}}\n')
    (root / "exports" / "earlier").mkdir(parents=True)
    (root / "exports" / "earlier" / "config.json").write_text("{}\n")
    return root


def cli(world: Path, *args: str, patch: str | None = None):
    # One persistent compilation cache for the module's processes (see tests/test_resume.py).
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(world / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    script = PATCHED.format(patch=patch) if patch else None
    return jaxprune(*args, cwd=world, env=cache, script=script)


def prune(world: Path, *extra: str, out: Path | None = None) -> list[str]:
    """``prune`` (Wanda on q/k/v/o: each layer is checkpointed) of the tiny model."""
    out = out or world / "runs"
    return [
        "prune",
        "--model",
        str(world / "model"),
        "--data-dir",
        str(world / "data"),
        "--method",
        "wanda",
        "--targets",
        "attn",
        "--out",
        str(out),
        *TINY_FLAGS,
        *extra,
    ]


def one_line(proc, *needles: str, status: int = 2, command: str = "prune") -> str:
    """stderr is the single line ``jaxprune COMMAND: ...`` holding ``needles``."""
    err = proc.stderr.strip()
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "\n" not in err and "Traceback" not in err, err[-3000:]
    assert err.startswith(f"jaxprune {command}: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def new_run(world: Path, before: set[Path], out: Path | None = None) -> Path:
    (run_dir,) = set((out or world / "runs").iterdir()) - before
    return run_dir


def dead_pid() -> int:
    """The id of a process that has exited (and been waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_full_disk_while_saving_params_is_one_line_and_the_run_resumes(world):
    earlier = snapshot(world / "runs" / EARLIER_RUN)
    before = set((world / "runs").iterdir())
    proc = cli(world, *prune(world, "--save-params", "true"), patch=ORBAX_FULL)
    run_dir = new_run(world, before)
    one_line(
        proc,
        f"error: no space left on the disk of {run_dir} while writing params/ (about ",
        " bytes uncompressed); free space there (or move the run folder to a larger disk",
        f"add --resume {run_dir} to the same command to go on.",
    )
    # Resumable: its layers and the complete masks are kept, the partial params/ is removed.
    assert sorted(p.name for p in run_dir.iterdir()) == ["layers", "masks", "run.json"]
    assert snapshot(world / "runs" / EARLIER_RUN) == earlier
    masks = snapshot(run_dir / "masks")

    resumed = cli(world, *prune(world, "--save-params", "true", "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "masks",
        "metrics.json",
        "params",
        "run.json",
    ]
    assert snapshot(run_dir / "masks") == masks  # complete, so kept as it was
    assert json.loads((run_dir / "metrics.json").read_text())["files"][-2:] == [
        "masks/",
        "params/",
    ]


def test_full_disk_during_export_removes_the_partial_export_and_the_run_resumes(world):
    exports = world / "exports"
    earlier = snapshot(exports / "earlier")
    before = set((world / "runs").iterdir())
    target = exports / "full"
    proc = cli(world, *prune(world, "--export-hf", str(target)), patch=EXPORT_FULL)
    run_dir = new_run(world, before)
    one_line(
        proc,
        f"error: --export-hf {target}: the disk filled up while the export was written (it needs "
        "about ",
        " free with the partial export removed); free space there, or choose a folder on a "
        "larger disk.",
        f"add --resume {run_dir} to the same command to go on.",
    )
    assert sorted(p.name for p in exports.iterdir()) == ["earlier"]
    assert snapshot(exports / "earlier") == earlier and not (run_dir / "metrics.json").exists()
    masks = snapshot(run_dir / "masks")

    resumed = cli(world, *prune(world, "--export-hf", str(target), "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "metrics.json").is_file() and snapshot(run_dir / "masks") == masks
    files = ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in target.iterdir()) == files
    assert hidden(exports) == [] and snapshot(exports / "earlier") == earlier
    # Every exported file has the mode the umask gives a new file (safetensors alone made 0600).
    modes = {f: (target / f).stat().st_mode & 0o777 for f in files}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ctrl_c_during_export_leaves_no_partial_and_later_exports_clear_dead_ones(world):
    exports = world / "exports"
    target = exports / "stopped"
    # Left by a killed export (its process is gone) and by one that still runs (this one).
    stale = exports / f".other.partial-{dead_pid()}"
    running = exports / f".other.partial-{os.getpid()}"
    for folder in (stale, running):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(10_000))

    before = set((world / "runs").iterdir())
    proc = cli(world, *prune(world, "--export-hf", str(target)), patch=EXPORT_CTRL_C)
    run_dir = new_run(world, before)
    one_line(
        proc,
        f"jaxprune prune: interrupted; the finished layers are saved: add --resume {run_dir}",
        status=130,
    )
    assert hidden(exports) == [running.name] and not target.exists()

    resumed = cli(world, *prune(world, "--export-hf", str(target), "--resume", str(run_dir)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert hidden(exports) == [running.name]


def test_export_without_room_is_refused_before_pruning(world):
    before = snapshot(world)
    target = world / "exports" / "roomless"
    proc = cli(world, *prune(world, "--export-hf", str(target)), patch=DISK_NEARLY_FULL)
    one_line(
        proc,
        f"error: --export-hf {target}: the export needs ",
        f" bytes but the disk of {world / 'exports'} has 1,000 bytes free; free space there, or "
        "choose a folder on a larger disk.",
    )
    assert snapshot(world) == before  # no run folder either


# --- On a real full disk (a small tmpfs; needs root) -------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where``, unmounted afterwards; skips if mount fails."""
    where.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.strip() or 'not root'}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_run_on_a_disk_that_fills_up_is_one_line_and_resumes_once_there_is_room(world, tmp_path):
    with small_disk(tmp_path / "disk", "256k") as disk:
        out = disk / "runs"
        proc = cli(world, *prune(world, "--save-params", "true", out=out))
        (run_dir,) = out.iterdir()
        # Whichever save met the full disk (a layer's checkpoint, masks/ or params/), one line.
        one_line(proc, f"error: no space left on the disk of {run_dir}", "--resume")
        assert "RESOURCE_EXHAUSTED" not in proc.stderr
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = cli(world, *prune(world, "--save-params", "true", "--resume", str(run_dir)))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert {"masks", "params", "metrics.json"} <= {p.name for p in run_dir.iterdir()}


def test_export_to_a_small_disk_is_refused_up_front_or_cleaned_up(world, tmp_path):
    with small_disk(tmp_path / "disk", "100k") as disk:
        target = disk / "model"
        out = tmp_path / "runs"
        proc = cli(world, *prune(world, "--export-hf", str(target), out=out))
        one_line(proc, f"--export-hf {target}: the export needs ", f"the disk of {disk} has ")
        assert not out.exists() and list(disk.iterdir()) == []
        # Without the check, safetensors meets the full disk itself (SafetensorError).
        unchecked = "from jaxprune import outputs\noutputs.require_free_space = print"
        proc = cli(world, *prune(world, "--export-hf", str(target), out=out), patch=unchecked)
        one_line(proc, f"--export-hf {target}: the disk filled up while the export was written")
        assert list(disk.iterdir()) == []


# --- In-process checks of the pieces ------------------------------------------------------------


def test_stale_exports_of_dead_processes_are_cleared(tmp_path):
    from jaxprune.outputs import remove_stale_exports

    gone = dead_pid()
    for name in (f".a.partial-{gone}", f".b.old-{gone}", f".c.old-{gone}", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / f".b.old-{gone}" / "config.json").write_text("{}")
    live = [f".a.partial-{os.getpid()}", ".a.partial-x", "a.partial-1"]
    for name in live:
        (tmp_path / name).mkdir()
    remove_stale_exports(tmp_path)
    # b's replacement never arrived, so its previous export is put back.
    assert (tmp_path / "b" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*live, "b", "c"])


def test_disk_full_is_recognised_however_the_writer_reports_it():
    from jaxprune.errors import is_disk_full, is_user_error

    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "a/0.0": Failed to write 200 bytes to file 4: No space '
        "left on device [os_error_code='28']"
    )
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(tensorstore) and is_disk_full(rust)
    try:
        try:
            raise tensorstore
        except ValueError as err:
            raise RuntimeError("commit failed") from err
    except RuntimeError as chained:
        assert is_disk_full(chained)
    assert not is_disk_full(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_disk_full(ValueError("RESOURCE_EXHAUSTED: Out of memory"))
    assert not is_user_error(tensorstore)  # a bug unless the writer's caller says what it was


def test_a_failed_write_holds_back_the_writers_logging(tmp_path, capsys):
    from jaxprune.errors import DiskFullError
    from jaxprune.outputs import writing

    absl = logging.getLogger("absl")
    with pytest.raises(DiskFullError) as info, writing(tmp_path, "params/", 2**21, " (or it)"):
        absl.error("Failed to write _CHECKPOINT_METADATA")
        print("Traceback (most recent call last): ...", file=sys.stderr)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == (
        f"no space left on the disk of {tmp_path} while writing params/ (about 2,097,152 bytes "
        "(2.0 MiB) uncompressed); free space there (or it)."
    )
    assert info.value.errno == errno.ENOSPC
    assert capsys.readouterr().err == ""
    # A write that succeeds passes on what it printed.
    with writing(tmp_path, "masks/"):
        print("a warning", file=sys.stderr)
    assert capsys.readouterr().err == "a warning\n"
    assert absl.propagate and not any(type(h).__name__ == "_Hold" for h in absl.handlers)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_weights_get_the_mode_of_the_other_files(tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = write_tiny_model(tmp_path / "model")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "model.safetensors" in modes
