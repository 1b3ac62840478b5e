"""A run directory has one writer and keeps the user's files: failed starts remove only what they made,
a second writer is refused naming the holder, a full disk leaves metrics.jsonl whole and resumable,
shards replaced under a running training stop it, and bad data or batch sizes are refused at start.

Real training processes throughout (issue 22, items 1, 2, 5, 6, 7, 9, 11, 12)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_rundir import RECIPE, cnn_sets

from cxrdist.rundir import GRADCAM_DIR, GRADCAM_GRID, LOCK_FILE, remove_run_outputs
from shard_tools.files import replace_dir
from shard_tools.locks import Busy, acquire

from launch import ROOT, accelerate_launch, quiet_env, run_module
from shardgen import write_shards


def one_line(stderr: str) -> str:
    """The error line: exactly one non-empty line, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    """`python -m cxrdist.train RECIPE args` in its own process group, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "cxrdist.train", str(ROOT / RECIPE), *args],
        cwd=cwd,
        env=quiet_env(PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


HOLD = (
    "import sys, time; from shard_tools.locks import acquire; acquire(sys.argv[1], 'x'); "
    "print('held', flush=True); time.sleep(600)"
)


def hold_lock(lock_file: Path) -> subprocess.Popen:
    """Another process holding the lock `lock_file`, as a second writer would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------------- item 1: the user's files


@pytest.mark.slow
def test_a_failed_start_into_a_shard_folder_keeps_its_manifest(cnn_shards, tmp_path):
    shards = tmp_path / "sh"
    shutil.copytree(cnn_shards, shards)
    before = listing(shards)
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(shards, shards, 1))
    assert res.returncode == 2
    assert "files cxrdist did not write" in one_line(res.stderr) and "manifest.json" in res.stderr
    assert listing(shards) == before  # manifest.json is still there, nothing added


@pytest.mark.slow
def test_a_failed_start_keeps_the_users_recipe_in_run_dir(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    recipe = (ROOT / RECIPE).read_bytes()
    (exp / "config.toml").write_bytes(recipe)
    sets = ["--set", f"run.dir={exp}", "--set", "data.shards=missing"]
    res = run_module("cxrdist.train", exp / "config.toml", *sets)
    assert res.returncode == 2, res.stderr[-3000:]
    one_line(res.stderr)
    assert listing(exp) == {"config.toml": recipe}


@pytest.mark.slow
def test_run_dir_as_the_current_folder_never_loses_files(cnn_shards, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    (here / "config.toml").write_text("# my own notes\n")
    (here / "manifest.json").write_text("{}")
    before = listing(here)
    proc = start("--set", "run.dir=", "--set", f"data.shards={cnn_shards}", cwd=here)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "files cxrdist did not write" in one_line(err)
    assert listing(here) == before


@pytest.mark.slow
def test_a_start_never_overwrites_a_users_config_or_report(cnn_shards, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.toml").write_text("# my notes, not a cxrdist header\n")
    (exp / "report.html").write_text("<p>my report</p>")
    before = listing(exp)
    for extra in ([], ["--overwrite"]):  # not even when asked to overwrite: cxrdist did not write them
        res = run_module("cxrdist.train", RECIPE, *cnn_sets(exp, cnn_shards, 1), *extra)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "config.toml" in one_line(res.stderr)
        assert listing(exp) == before


def test_overwrite_removes_only_cxrdists_files_in_gradcam(tmp_path):
    gradcam = tmp_path / GRADCAM_DIR
    gradcam.mkdir()
    (gradcam / GRADCAM_GRID).write_bytes(b"grid")
    (gradcam / "explain_summary.json").write_text("{}")
    (gradcam / "my_figure.png").write_bytes(b"mine")
    (tmp_path / "metrics.jsonl").write_text("")
    remove_run_outputs(tmp_path)
    assert listing(tmp_path) == {f"{GRADCAM_DIR}/my_figure.png": b"mine"}


@pytest.mark.slow
def test_sigterm_right_after_the_run_dir_is_made_leaves_nothing(cnn_shards, tmp_path):
    run_dir = tmp_path / "new" / "run"
    proc = start(*cnn_sets(run_dir, cnn_shards, 1))
    wait_for(run_dir.exists, proc=proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:] + err[-3000:]
    assert "SIGTERM" in one_line(err)
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------- item 5: one writer


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_one_blocks_nothing(cnn_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir / LOCK_FILE)
    try:
        res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 1))
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"pid {holder.pid} on " in one_line(res.stderr)
    finally:
        holder.kill()  # dies holding the lock: the OS releases it
        holder.wait()
    assert not (run_dir / "config.toml").exists()

    # A training holds the lock for its whole life, and a killed one blocks nothing.
    proc = start(*cnn_sets(run_dir, cnn_shards, 50))
    try:
        wait_for(lambda: f'"pid": {proc.pid}' in (run_dir / LOCK_FILE).read_text(), proc=proc)
        with pytest.raises(Busy, match=f"pid {proc.pid} on .*cxrdist.train"):
            acquire(run_dir / LOCK_FILE, "test")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    acquire(run_dir / LOCK_FILE, "test").release()


@pytest.mark.slow
def test_two_trainings_started_together_into_a_new_run_dir_never_mix(cnn_shards, tmp_path):
    run_dir = tmp_path / "new" / "run"
    jobs = [start(*cnn_sets(run_dir, cnn_shards, 3)) for _ in range(2)]
    loser = None
    while loser is None:  # the refused one ends first, within seconds
        loser = next((job for job in jobs if job.poll() is not None), None)
        time.sleep(0.05)
    winner = jobs[1 - jobs.index(loser)]
    _, err = loser.communicate()
    assert loser.returncode == 2 and f"(pid {winner.pid} on " in one_line(err)
    if winner.poll() is None:  # the loser, which also found the folder missing, left the winner's lock alone
        with pytest.raises(Busy):
            acquire(run_dir / LOCK_FILE, "test")
    out, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err[-3000:]
    assert [json.loads(r)["epoch"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_every_rank_agrees_on_a_held_run_dir(cnn_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(run_dir / LOCK_FILE)
    try:
        res = accelerate_launch(2, "cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 1))
    finally:
        holder.kill()
        holder.wait()
    ranks_said = res.stderr.split("Traceback")[0]  # then only the launcher's own ChildFailedError report
    assert res.stderr.count("Traceback") <= 1 and "ChildFailedError" in res.stderr, res.stderr[-3000:]
    assert f"[rank 0] error: run.dir {run_dir} is in use by another process (pid {holder.pid} " in ranks_said
    assert "[rank 1] error: the main process could not use run.dir" in ranks_said  # both stop, together
    assert not (run_dir / "config.toml").exists()


# ---------------------------------------------------------------------- item 11: resume, batch size


@pytest.mark.slow
@pytest.mark.parametrize("content", ["{}", "[]", "missing-test", None])
def test_resume_with_a_broken_run_manifest_is_one_line(cnn_shards, tmp_path, content):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "epoch-0001").mkdir(parents=True)
    manifest = json.loads((cnn_shards / "manifest.json").read_text())
    if content == "missing-test":
        del manifest["splits"]["test"]
        content = json.dumps(manifest)
    if content is not None:
        (run_dir / "manifest.json").write_text(content)
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 2), "--resume")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "manifest.json" in one_line(res.stderr)


@pytest.mark.slow
def test_an_absurd_batch_size_is_refused_at_start(cnn_shards, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    absurd = ["--set", "train.per_device_batch_size=100000000"]
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 1), *absurd)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "per_device_batch_size 100000000" in one_line(res.stderr)
    assert time.monotonic() - started < 40 and not run_dir.exists()


# ------------------------------------------------------------------------------ item 7: empty splits


@pytest.mark.slow
@pytest.mark.parametrize("empty", ["val", "test"])
def test_an_empty_split_is_refused_at_start_naming_it(tmp_path, empty):
    shards = tmp_path / "shards"
    sizes = {"train": [40], "val": [12], "test": [12]}
    sizes[empty] = []
    write_shards(shards, sizes, image_size=128)
    run_dir = tmp_path / "run"
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, shards, 1))
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"no images in the {empty} split" in one_line(res.stderr)
    assert not run_dir.exists()


# ------------------------------------------------------------------------------- item 2: a full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A real 24 MiB tmpfs (root only): room for the run's checkpoints, and then some."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the file system is full; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_full_disk_mid_training_is_one_line_keeps_metrics_whole_and_resume_works(cnn_shards, small_disk):
    run_dir = small_disk / "run"
    # A learning rate too small to change the accuracy: no new best/ after epoch 1, and rows of one size
    # (about 1.2 kB), so the fourth row is the first that does not fit in the file's last 4 kB page: the
    # one an append would tear when the disk is full.
    sets = [*cnn_sets(run_dir, cnn_shards, 6), "--set", "run.keep_checkpoints=1"]
    sets += ["--set", "optim.lr=1e-9", "--set", "train.best_metric=accuracy"]
    proc = start(*sets)
    ckpts = run_dir / "checkpoints"
    wait_for(lambda: (ckpts / "epoch-0003").exists() and not (ckpts / "epoch-0002").exists(), proc=proc)
    filler = fill(small_disk)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "No space left on device" in one_line(err)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # no torn line
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))

    filler.unlink()
    res = run_module("cxrdist.train", RECIPE, *sets, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_of_an_older_run_is_dropped(tmp_path):
    from cxrdist.rundir import RunDirError, read_metrics_rows

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "train_lo')
    assert read_metrics_rows(tmp_path) == [{"epoch": 1, "train_loss": 1.0}]
    path.write_text('{"epoch": 1, "tra\n{"epoch": 2}\n')
    with pytest.raises(RunDirError, match="line 1"):
        read_metrics_rows(tmp_path)


# ------------------------------------------------------------------- item 6: shards replaced mid-run


@pytest.mark.slow
def test_shards_replaced_under_a_running_training_stop_it(cnn_shards, train_src, tmp_path):
    from shard_tools.pack import pack

    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(cnn_shards, shards)
    proc = start(*cnn_sets(run_dir, shards, 30), "--set", "data.cache=none")
    wait_for((run_dir / "metrics.jsonl").exists, proc=proc)
    repacked = tmp_path / ".shards.new"  # the same images split with another seed, swapped in as pack does
    size = json.loads((cnn_shards / "manifest.json").read_text())["image_size"]
    pack(train_src, repacked, size=size, min_shards=4, seed=1, progress=False)
    replace_dir(repacked, shards)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "changed while this run read its shards" in one_line(err)
    assert not (run_dir / "test_metrics.json").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) < 30


# ----------------------------------------------------------------- item 5: one writer per output, too


def _command(name: str, tmp_path: Path, src: Path) -> tuple[list[str], Path]:
    """The command line of `name` writing into tmp_path, and the lock file a second writer would hold."""
    model = tmp_path / "run"
    commands = {
        "pack": (["shard_tools.pack", src, tmp_path / "out", "--size", "32"], tmp_path / ".out.lock"),
        "evaluate": (
            ["cxrdist.evaluate", model, "--shards", src, "--out", tmp_path / "e.json"],
            tmp_path / ".e.json.lock",
        ),
        "explain": (["cxrdist.explain", model, src, "--out", tmp_path / "cams"], tmp_path / ".cams.lock"),
        "export": (["cxrdist.export", model, "--out", tmp_path / "m.onnx"], tmp_path / ".m.onnx.lock"),
        "report": (["cxrdist.report", model], model / LOCK_FILE),
    }
    return commands[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pack", "evaluate", "explain", "export", "report"])
def test_every_writing_command_refuses_a_second_writer_naming_it(synth_src, tmp_path, name):
    (tmp_path / "run").mkdir()
    args, lock_file = _command(name, tmp_path, synth_src)
    holder = hold_lock(lock_file)
    try:
        res = run_module(*args)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"is in use by another process (pid {holder.pid} on " in one_line(res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["run", lock_file.name] if name != "report" else ["run"]
    )


# -------------------------------------------------------------------------- item 9: signals at start


@pytest.mark.slow
@pytest.mark.parametrize("module", ["cxrdist.train", "cxrdist.evaluate", "cxrdist.export", "cxrdist.explain"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_while_a_command_still_imports_is_one_line(module, sig, code):
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        env=quiet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, signalled whole as a terminal or scancel does
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    wait_for(lambda: "libtorch" in maps.read_text(), timeout=60, proc=proc)  # inside `import torch`
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-3000:]
    assert "stopped" in one_line(err)


# `python -m cxrdist.export`, saying "exporting" the moment torch.onnx.export is called.
EXPORT_ANNOUNCED = """
import runpy, sys, torch
export = torch.onnx.export
def announced(*args, **kwargs):
    print("exporting", flush=True)
    return export(*args, **kwargs)
torch.onnx.export = announced
sys.argv = ["cxrdist.export", *sys.argv[1:]]
runpy.run_module("cxrdist.export", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.0, 1.0])
def test_sigterm_during_the_onnx_export_is_one_line_and_143(trained_run, tmp_path, after_s):
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORT_ANNOUNCED, trained_run, "--out", out],
        cwd=ROOT,
        env=quiet_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "exporting"
    time.sleep(after_s)  # the exporter runs for 2-3 s here, importing torch._dynamo and onnxscript first
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in one_line(err)
    assert list(tmp_path.iterdir()) == []  # no model, no temporary, no lock file


# ----------------------------------------------------------------- item 12: torn checkpoints, stalls


@pytest.mark.slow
@pytest.mark.parametrize("torn", ["model.safetensors", "optimizer.bin", "train_state.json"])
def test_a_torn_checkpoint_file_is_refused_on_resume_with_one_line(cnn_shards, tmp_path, torn):
    run_dir = tmp_path / "run"
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 1))
    assert res.returncode == 0, res.stderr[-3000:]
    path = run_dir / "checkpoints" / "epoch-0001" / torn
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a power loss before fsync left it
    res = run_module("cxrdist.train", RECIPE, *cnn_sets(run_dir, cnn_shards, 2), "--resume")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "cannot resume from" in one_line(res.stderr) and "epoch-0001" in res.stderr


def test_checkpoints_are_flushed_before_the_rename(tmp_path, monkeypatch):
    from cxrdist import checkpoint

    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "ckpt" / "sub" / "x").write_bytes(b"x")
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        checkpoint.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd)
    )
    checkpoint.fsync_tree(tmp_path / "ckpt")
    names = {Path(p).relative_to(tmp_path).as_posix() for p in synced}
    assert names == {"ckpt", "ckpt/sub", "ckpt/model.safetensors", "ckpt/sub/x"}


def test_a_stalled_http_shard_times_out_and_continues_with_range(monkeypatch):
    """A server that stops sending mid-body without closing (a stall, not a failure): the read times out
    after HTTP_TIMEOUT_S and the reader continues with a Range request, instead of hanging."""
    import http.server
    import threading

    from cxrdist import streams

    body = bytes(range(256)) * 64
    ranges = []

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ranges.append(self.headers.get("Range"))
            start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if start:
                self.wfile.write(body[start:])
                return
            self.wfile.write(body[:5000])
            self.wfile.flush()
            time.sleep(5)  # stalled: the connection stays open, nothing more comes

        def log_message(self, *args):
            pass

    monkeypatch.setattr(streams, "HTTP_TIMEOUT_S", 0.5)
    monkeypatch.setattr(streams, "HTTP_BACKOFF_S", 0.01)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with streams.open_url(f"http://127.0.0.1:{server.server_address[1]}/train-000000.tar") as f:
            assert f.read() == body
        assert time.monotonic() - started < 4
        assert ranges == [None, "bytes=5000-"]
    finally:
        server.shutdown()
        server.server_close()
