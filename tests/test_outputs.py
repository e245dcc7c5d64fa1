"""The output policy (nybble.outputs) of every command that writes: no output overlaps an
input, --overwrite replaces only nybble's own folders, atomic replacement, signals, stale
staging folders, locking, file modes. Real subprocesses for signals and concurrent runs.

nybble.outputs is imported inside the tests that need it, so that every test here fails on
code without the policy by what it checks, not by an import error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from nybble import _core
from nybble.cli import main

MARKER = ".nybble-output.json"


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def write_model(folder: Path, n_tensors: int = 4, rows: int = 64, cols: int = 64, side_files=True) -> Path:
    """A small model folder: ``n_tensors`` linear weights, a config.json and a tokenizer file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n_tensors):
        a = (rng.standard_normal((rows, cols)) * 0.05).astype(ml_dtypes.bfloat16)
        items.append((f"layers.{i}.dense.weight", "BF16", [rows, cols], a.reshape(-1).view(np.uint8)))
    _core.write_safetensors_file(str(folder / "model.safetensors"), items, {"format": "pt"})
    if side_files:
        (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": cols}))
        (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def model(tmp_path) -> Path:
    return write_model(tmp_path / "model")


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory) -> Path:
    """24,000 small tensors: about two seconds of quantizing on one thread, so that a signal
    or a second run arrives mid-run."""
    folder = tmp_path_factory.mktemp("many") / "model"
    folder.mkdir()
    a = (np.random.default_rng(0).standard_normal((32, 64)) * 0.05).astype(ml_dtypes.bfloat16)
    data = a.reshape(-1).view(np.uint8)
    items = [(f"layers.{i}.dense.weight", "BF16", [32, 64], data) for i in range(24000)]
    _core.write_safetensors_file(str(folder / "model.safetensors"), items, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


def nybble_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "nybble.cli", *[str(a) for a in args]]


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(nybble_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def staging_folders(parent: Path) -> list[str]:
    """Hidden folders nybble works in beside an output (any version's names)."""
    return [n for n in os.listdir(parent) if n.startswith(".") and ".nybble-" in n and not n.endswith("-lock")]


def wait_for_staging(proc: subprocess.Popen, parent: Path, timeout: float = 60.0) -> None:
    """Returns once the run has created its staging folder (it is then mid-run)."""
    deadline = time.monotonic() + timeout
    while not staging_folders(parent):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before its staging folder was seen (rc {proc.returncode}): {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no staging folder appeared")
        time.sleep(0.001)


# ============================================================================ overlap with inputs


def test_dequantize_into_the_parent_of_its_input_with_overwrite_deletes_nothing(tmp_path, model):
    # The case of the issue: `dequantize work/packed -o work --overwrite` deleted work/.
    work = tmp_path / "work"
    assert invoke("quantize", model, "-o", work / "packed", "--no-stats").exit_code == 0
    (work / "unrelated.txt").write_text("mine")
    before = tree_hash(work)
    result = invoke("dequantize", work / "packed", "-o", work, "--overwrite")
    assert result.exit_code == 1, result.output
    assert "must not contain an input" in result.output and str(work) in result.output
    assert tree_hash(work) == before
    assert names(tmp_path) == ["model", "work"]  # no staging folder, no lock file


@pytest.mark.parametrize("overwrite", [True, False])
def test_dequantize_onto_or_into_its_input_is_refused(tmp_path, model, overwrite):
    packed = tmp_path / "packed"
    assert invoke("quantize", model, "-o", packed, "--no-stats").exit_code == 0
    before = tree_hash(packed)
    flag = ["--overwrite"] if overwrite else []
    for out in (packed, packed / "sub", packed / "1" / "2"):
        result = invoke("dequantize", packed, "-o", out, *flag)
        assert result.exit_code == 1, result.output
        assert "must not be the input or inside it" in result.output, result.output
    assert tree_hash(packed) == before
    assert names(tmp_path) == ["model", "packed"]


def test_input_reached_through_symlinks_is_still_an_input(tmp_path):
    # A model folder as the Hugging Face cache lays it out: the shard is a link into blobs/.
    blobs = tmp_path / "blobs"
    write_model(blobs, side_files=False)
    (blobs / "model.safetensors").rename(blobs / "0123abcd")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blobs / "0123abcd")
    before = tree_hash(blobs)
    # The output would contain the real shard: refused even with --overwrite.
    result = invoke("quantize", snap, "-o", blobs, "--overwrite", "--no-stats")
    assert result.exit_code == 1 and "must not contain an input" in result.output, result.output
    # A link to the input folder is the input folder.
    (tmp_path / "alias").symlink_to(snap)
    result = invoke("quantize", snap, "-o", tmp_path / "alias" / "out", "--no-stats")
    assert result.exit_code == 1 and "must not be the input or inside it" in result.output, result.output
    assert tree_hash(blobs) == before and names(snap) == ["model.safetensors"]


def test_quantize_output_around_its_input_is_refused(tmp_path):
    src = write_model(tmp_path / "runs" / "model")
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path / "runs")
    result = invoke("quantize", src / "model.safetensors", "-o", tmp_path / "runs", "--overwrite")
    assert result.exit_code == 1 and "must not contain an input" in result.output, result.output
    assert tree_hash(tmp_path / "runs") == before


# ============================================================================ what --overwrite replaces


def test_every_output_folder_is_marked_with_what_nybble_wrote(tmp_path, model):
    out = tmp_path / "q"
    assert invoke("quantize", model, "-o", out, "--no-stats").exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "nybble" and marker["command"] == "quantize" and marker["nybble_version"]
    assert set(marker["entries"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    back = tmp_path / "back"
    assert invoke("dequantize", out, "-o", back).exit_code == 0
    marker = json.loads((back / MARKER).read_text())  # its own marker, not the input's copied along
    assert marker["command"] == "dequantize" and MARKER not in marker["entries"]
    # --overwrite replaces a nybble output: the whole folder, atomically.
    result = invoke("quantize", model, "-o", out, "--quant", "int8", "--overwrite", "--no-stats")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert names(tmp_path) == ["back", "model", "q"]


def _not_nybbles(tmp_path, model, kind):
    """An existing output that --overwrite must not replace."""
    out = tmp_path / "out"
    if kind == "foreign folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "empty folder":
        out.mkdir()
    elif kind == "file":
        out.write_text("a file")
    elif kind == "link to a nybble output":
        assert invoke("quantize", model, "-o", tmp_path / "real", "--no-stats").exit_code == 0
        out.symlink_to(tmp_path / "real")
    elif kind == "nybble output with a file added":
        assert invoke("quantize", model, "-o", out, "--no-stats").exit_code == 0
        (out / "1_Pooling").mkdir()
        (out / "1_Pooling" / "added.txt").write_text("added by hand")
    elif kind == "forged marker":
        out.mkdir()
        (out / MARKER).write_text("{not json")
        (out / "data.bin").write_text("x")
    elif kind == "marker of another tool":
        out.mkdir()
        (out / MARKER).write_text(json.dumps({"written_by": "someone", "command": "quantize", "entries": []}))
    elif kind == "finetune output":
        out.mkdir()
        (out / MARKER).write_text(json.dumps({"written_by": "nybble", "command": "finetune"}))
        (out / "checkpoint-000100").mkdir()
    return out


@pytest.mark.parametrize("kind", ["foreign folder", "empty folder", "file", "link to a nybble output",
                                  "nybble output with a file added", "forged marker", "marker of another tool",
                                  "finetune output"])
@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_overwrite_replaces_only_a_folder_nybble_wrote(tmp_path, model, kind, command):
    src = model
    if command == "dequantize":
        src = tmp_path / "packed"
        assert invoke("quantize", model, "-o", src, "--no-stats").exit_code == 0
    out = _not_nybbles(tmp_path, model, kind)
    before = {p.name: tree_hash(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    result = invoke(command, src, "-o", out, "--overwrite")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and f"cannot overwrite {out}" in result.output, result.output
    after = {p.name: tree_hash(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing replaced, no staging folder or lock file left
    if kind == "link to a nybble output":
        assert out.is_symlink()


def test_existing_foreign_output_without_overwrite_says_overwrite_would_not_help(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = invoke("quantize", model, "-o", out)
    assert result.exit_code == 1 and "already exists" in result.output
    assert "was not written by nybble" in result.output


# ============================================================================ save_adapter, finetune


def _lora_model():
    torch = pytest.importorskip("torch")
    import nybble

    torch.manual_seed(0)
    model = nybble.quantize_model(torch.nn.Sequential(torch.nn.Linear(16, 32)), "nf4", skip_modules=())
    return nybble.add_lora(model, r=4, alpha=8)


def test_save_adapter_writes_only_into_a_new_empty_or_nybble_folder(tmp_path, model):
    import nybble
    from nybble import outputs

    lora = _lora_model()
    nybble.save_adapter(lora, tmp_path / "new")  # created and marked
    assert json.loads((tmp_path / "new" / MARKER).read_text())["command"] == "save_adapter"
    nybble.save_adapter(lora, tmp_path / "new")  # its own folder again: fine
    (tmp_path / "empty").mkdir()
    nybble.save_adapter(lora, tmp_path / "empty")
    foreign = tmp_path / "peft"
    foreign.mkdir()
    (foreign / "adapter_model.safetensors").write_bytes(b"someone else's adapter")
    with pytest.raises(outputs.OutputError, match="nybble did not write"):
        nybble.save_adapter(lora, foreign)
    assert (foreign / "adapter_model.safetensors").read_bytes() == b"someone else's adapter"
    with pytest.raises(outputs.OutputError, match="must not be the input"):
        nybble.save_adapter(lora, model, base_model_name_or_path=str(model))
    with pytest.raises(outputs.OutputError, match="output of nybble quantize"):
        packed = tmp_path / "packed"
        assert invoke("quantize", model, "-o", packed, "--no-stats").exit_code == 0
        nybble.save_adapter(lora, packed)
    assert names(model) == ["config.json", "model.safetensors", "tokenizer.json"]


def _finetune(*args):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return CliRunner().invoke(main, ["finetune", *[str(a) for a in args], "--max-steps", "1", "--no-progress"])


def test_finetune_output_must_not_overlap_its_inputs(tmp_path, model):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    before = tree_hash(model)
    for out, says in [(model, "must not be the input"), (model / "adapter", "must not be the input or inside it"),
                      (tmp_path, "must not contain an input")]:
        r = _finetune(model, "--data", data, "-o", out)
        assert r.exit_code == 1 and says in r.output, r.output
    assert tree_hash(model) == before
    # The data may live in the output folder, but not where finetune writes.
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"written_by": "nybble", "command": "finetune"}))
    bad = out / "adapter_config.json"
    bad.write_text('{"text": "hello"}\n')
    r = _finetune(model, "--data", bad, "-o", out)
    assert r.exit_code == 1 and "where finetune writes" in r.output, r.output
    assert bad.read_text() == '{"text": "hello"}\n'


def test_finetune_refuses_a_folder_nybble_did_not_write_and_a_locked_one(tmp_path, model):
    from nybble import outputs

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    home = tmp_path / "home"
    home.mkdir()
    (home / "adapter_model.safetensors").write_bytes(b"precious")
    r = _finetune(model, "--data", data, "-o", home)
    assert r.exit_code == 1 and "nybble did not write" in r.output, r.output
    assert (home / "adapter_model.safetensors").read_bytes() == b"precious"
    busy = tmp_path / "busy"
    with outputs.OutputLock(busy):
        r = _finetune(model, "--data", data, "-o", busy)
    assert r.exit_code == 1 and "being written by another nybble run" in r.output, r.output
    assert not (tmp_path / ".busy.nybble-lock").exists()


# ============================================================================ atomic replacement


def test_overwrite_swaps_in_one_rename_exchange(tmp_path, model, monkeypatch):
    from nybble import outputs

    out = tmp_path / "q"
    assert invoke("quantize", model, "-o", out, "--no-stats").exit_code == 0
    calls = []
    real = outputs.renameat2

    def spy(src, dst, flags):
        calls.append((Path(src).name, Path(dst).name, flags, (Path(dst) / MARKER).is_file()))
        real(src, dst, flags)
        assert (Path(dst) / "model.safetensors").is_file()  # the output path is never empty

    monkeypatch.setattr(outputs, "renameat2", spy)
    assert invoke("quantize", model, "-o", out, "--quant", "fp4", "--overwrite", "--no-stats").exit_code == 0
    assert [(c[1], c[2], c[3]) for c in calls] == [("q", outputs.RENAME_EXCHANGE, True)]
    assert ".q.nybble-staging-" in calls[0][0]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    # A new output: RENAME_NOREPLACE, so an output that appears meanwhile is never replaced.
    calls.clear()
    assert invoke("quantize", model, "-o", tmp_path / "new", "--no-stats").exit_code == 0
    assert [(c[1], c[2]) for c in calls] == [("new", outputs.RENAME_NOREPLACE)]
    assert names(tmp_path) == ["model", "new", "q"]


def _run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


_KILL_ON_NTH_RENAME = """
import os, sys
try:
    from nybble import outputs
    outputs._renameat2_fn = None  # the documented fallback: two renames
except ImportError:  # code without the output policy renames twice anyway
    pass
real, n = os.rename, []
def rename(a, b):
    n.append(1)
    if len(n) == 2:  # between the two renames
        os._exit(137)
    real(a, b)
os.rename = rename
from nybble.cli import main
sys.argv = ["nybble", "quantize", {model!r}, "-o", "out", "--quant", "int8", "--overwrite", "--no-stats"]
main()
"""


def test_fallback_kill_between_the_two_renames_is_undone_by_the_next_run(tmp_path, model):
    out = tmp_path / "out"
    assert invoke("quantize", model, "-o", out, "--no-stats").exit_code == 0
    before = tree_hash(out)
    proc = _run_script(_KILL_ON_NTH_RENAME.format(model=str(model)), tmp_path)
    assert proc.returncode == 137, proc.stderr
    assert not out.exists()  # the documented window of the fallback ...
    assert [n for n in names(tmp_path) if ".out.nybble-old-" in n]  # ... the old output aside
    result = invoke("quantize", model, "-o", out, "--no-stats")  # the next run puts it back
    assert result.exit_code == 1 and "already exists" in result.output, result.output
    assert tree_hash(out) == before
    assert names(tmp_path) == ["model", "out"]


_KILL_IN_CLEANUP = """
import shutil, os, sys
real = shutil.rmtree
def rmtree(path, *a, **k):
    if ".nybble-staging-" in str(path) or ".nybble-old-" in str(path):
        os._exit(137)  # killed after the swap, before the old contents are removed
    real(path, *a, **k)
shutil.rmtree = rmtree
from nybble.cli import main
sys.argv = ["nybble", "quantize", {model!r}, "-o", "out", "--quant", "int8", "--overwrite", "--no-stats"]
main()
"""


def test_kill_after_the_swap_leaves_the_new_output_and_the_next_run_removes_the_old(tmp_path, model):
    out = tmp_path / "out"
    assert invoke("quantize", model, "-o", out, "--no-stats").exit_code == 0
    proc = _run_script(_KILL_IN_CLEANUP.format(model=str(model)), tmp_path)
    assert proc.returncode == 137, proc.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert len(staging_folders(tmp_path)) == 1  # the previous output, under a dead run's name
    assert invoke("quantize", model, "-o", tmp_path / "other", "--no-stats").exit_code == 0
    assert names(tmp_path) == ["model", "other", "out"]


# ============================================================================ signals


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_mid_quantize_removes_the_staging_folder(tmp_path, many_tensors, sig, code):
    out = tmp_path / "out"
    proc = start("quantize", many_tensors, "-o", out, "--threads", "1")
    wait_for_staging(proc, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert f"interrupted ({signal.Signals(sig).name}); no output was written" in err and "Traceback" not in err
    assert names(tmp_path) == []  # no output, no staging folder, no lock file
    if sig == signal.SIGHUP:
        # An ignored SIGHUP (nohup) stays ignored: the run completes.
        proc = start("quantize", many_tensors, "-o", out, "--threads", "1", "--no-stats",
                     preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        wait_for_staging(proc, tmp_path)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert names(tmp_path) == ["out"]


def test_sigterm_mid_dequantize_removes_the_staging_folder(tmp_path, many_tensors):
    packed = tmp_path / "packed"
    assert invoke("quantize", many_tensors, "-o", packed, "--no-stats").exit_code == 0
    proc = start("dequantize", packed, "-o", tmp_path / "back")
    wait_for_staging(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted (SIGTERM)" in err
    assert names(tmp_path) == ["packed"]


def test_sigkill_leaves_a_staging_folder_that_the_next_run_removes(tmp_path, many_tensors, model):
    proc = start("quantize", many_tensors, "-o", tmp_path / "out", "--threads", "1")
    wait_for_staging(proc, tmp_path)
    proc.kill()
    proc.wait()
    assert len(staging_folders(tmp_path)) == 1 and (tmp_path / ".out.nybble-lock").exists()
    # The next run in the same folder (any output) removes it, and the stale lock file too.
    assert invoke("quantize", model, "-o", tmp_path / "other", "--no-stats").exit_code == 0
    assert names(tmp_path) == ["model", "other"]
    result = invoke("quantize", model, "-o", tmp_path / "out", "--no-stats")
    assert result.exit_code == 0, result.output
    assert names(tmp_path) == ["model", "other", "out"]


def test_only_staging_folders_of_dead_nybble_runs_are_removed(tmp_path, model):
    from nybble import outputs

    def name(host=None, boot=None, pid=None, start=None, tag="staging"):
        host = host or outputs._host_id()
        boot = boot or outputs._boot_id()
        pid = os.getpid() if pid is None else pid
        start = outputs.process_start_time(os.getpid()) if start is None else start
        return f".out.nybble-{tag}-{host}-{boot}-{pid}-{start}-0123abcd"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    keep, remove = [], []

    def folder(n, into):
        (tmp_path / n).mkdir()
        (tmp_path / n / "model.safetensors").write_bytes(b"x")
        into.append(n)

    folder(name(pid=dead.pid, start=12345), remove)  # a dead pid
    folder(name(start=outputs.process_start_time(os.getpid()) + 1), remove)  # a live pid, another process's
    folder(name(boot="f" * 12, pid=dead.pid), remove)  # before the last boot of this host
    folder(name(), keep)  # this very process: alive
    folder(name(host="e" * 12, pid=dead.pid), keep)  # another host sharing the file system
    folder(name(host="e" * 12, boot="f" * 12, pid=dead.pid), keep)
    folder(f".out.nybble-{dead.pid}-0123abcd", keep)  # not a name of this version's
    folder(".out.nybble-staging-not-ours", keep)
    folder("out.nybble-staging-lookalike", keep)
    (tmp_path / name(pid=dead.pid, start=1).replace("0123abcd", "0000ffff")).write_text("a file, not a folder")
    keep.append(name(pid=dead.pid, start=1).replace("0123abcd", "0000ffff"))
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("x")
    link = name(pid=dead.pid, start=1).replace("0123abcd", "11112222")
    (tmp_path / link).symlink_to(target)  # a link named like a staging folder: never followed
    keep += [link, "target"]

    result = invoke("quantize", model, "-o", tmp_path / "q", "--no-stats")
    assert result.exit_code == 0, result.output
    assert names(tmp_path) == sorted(keep + ["model", "q"])
    assert (target / "precious").read_text() == "x"
    # The same cleanup, called directly, finds nothing more to do.
    assert outputs.remove_dead_staging(tmp_path) == []


# ============================================================================ locking


def test_concurrent_run_on_the_same_output_fails_at_once(tmp_path, many_tensors):
    out = tmp_path / "out"
    first = start("quantize", many_tensors, "-o", out, "--threads", "1", "--quant", "int8", "--no-stats")
    wait_for_staging(first, tmp_path)
    for extra in ([], ["--overwrite"]):
        t0 = time.monotonic()
        second = subprocess.run(nybble_cmd("quantize", many_tensors, "-o", out, *extra), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1, second.stderr[-2000:]
        assert "is being written by another nybble run" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert time.monotonic() - t0 < 30 and first.poll() is None  # it failed while the first ran
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]  # the first's
    assert names(tmp_path) == ["out"]  # the lock file is gone


def test_lock_held_in_process_refuses_and_a_stale_lock_file_is_harmless(tmp_path, model):
    from nybble import outputs

    out = tmp_path / "out"
    with outputs.OutputLock(out) as lock:
        assert lock.path == tmp_path / ".out.nybble-lock"
        result = invoke("quantize", model, "-o", out, "--no-stats")
        assert result.exit_code == 1 and "being written by another nybble run" in result.output
        assert f"pid {os.getpid()}" in result.output
    assert names(tmp_path) == ["model"]
    # A lock file left by a killed run: nobody holds it, so the next run takes it and removes it.
    (tmp_path / ".out.nybble-lock").write_text("99999999\n")
    result = invoke("quantize", model, "-o", out, "--no-stats")
    assert result.exit_code == 0, result.output
    assert names(tmp_path) == ["model", "out"]


# ============================================================================ file modes


_MODES = """
import os, sys
os.umask({umask})
from nybble.cli import main
sys.argv = ["nybble", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_file_written_honours_the_umask(tmp_path, model, umask):
    os.chmod(model / "tokenizer.json", 0o600)  # copied files take the umask's mode, not the source's
    os.chmod(model / "config.json", 0o644)
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text("{}")
    script = _MODES.format(umask=oct(umask))
    for args in (["quantize", model, "-o", tmp_path / "q", "--no-stats"],
                 ["dequantize", tmp_path / "q", "-o", tmp_path / "d"]):
        proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
    for out in (tmp_path / "q", tmp_path / "d"):
        found = {}
        for p in [out, *out.rglob("*")]:
            found[str(p.relative_to(tmp_path))] = stat.S_IMODE(p.stat().st_mode)
        want = {k: (0o777 if (tmp_path / k).is_dir() else 0o666) & ~umask for k in found}
        assert found == want


def test_adapter_files_honour_the_umask(tmp_path):
    import nybble

    lora = _lora_model()
    old = os.umask(0o002)
    try:
        nybble.save_adapter(lora, tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()}
    assert modes == {"adapter_model.safetensors": 0o664, "adapter_config.json": 0o664, MARKER: 0o664}


# ============================================================================ finetune and signals


_FINETUNE_SIGNAL = """
import os, signal, sys
from nybble.train import trainer
real, calls = trainer.token_loss_sum, [0]
def loss(logits, labels):
    calls[0] += 1
    if calls[0] == 3:  # grad_accum 2: the first micro-batch of step 2
        os.kill(os.getpid(), signal.SIGTERM)
    return real(logits, labels)
trainer.token_loss_sum = loss
from nybble.cli import main
sys.argv = ["nybble", "finetune", *sys.argv[1:]]
main()
"""


def test_sigterm_during_finetune_saves_the_finished_steps_and_exits_143(tmp_path):
    from conftest import tiny_llama_dir

    from nybble.train import example

    tiny = tiny_llama_dir(tmp_path / "llama", hidden=32, layers=1)
    data = example.make_dataset(tmp_path / "train.jsonl", n=32)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _FINETUNE_SIGNAL, str(tiny), "--data", str(data), "-o", str(out),
                           "--max-steps", "4", "--batch-size", "4", "--grad-accum", "2", "--max-length", "16",
                           "--r", "4", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted by SIGTERM after step 2 of 4" in proc.stdout + proc.stderr
    assert (out / "checkpoint-000002" / "trainer_state.json").is_file()
    assert json.loads((out / MARKER).read_text())["command"] == "finetune"
    assert not (tmp_path / ".run.nybble-lock").exists()
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "checkpoint-000002/adapter_model.safetensors" in modes and "checkpoint-000002/optimizer.pt" in modes
    assert modes == {k: 0o666 & ~mask for k in modes}  # the adapter too (safetensors alone writes 0600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tiny.rglob("*") if p.is_file()} == {0o666 & ~mask}  # the example
