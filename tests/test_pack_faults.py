"""shard_tools.pack when the target is wrong or the run is cut short: one line, the right exit code, and
nothing half-written (no OUT, or the previous OUT intact, and no staging folder left behind)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import REPO

from shard_tools.cli import run_main
from shard_tools.errors import EXIT_FAILED, EXIT_SIGTERM, EXIT_USAGE, InputError
from shard_tools.locks import lock_path_beside
from shard_tools.pack import main, pack
from shard_tools.schema import CLASSES, MANIFEST_NAME

# A pack slowed down to ~50 ms per image, so a signal lands mid-run; workers are forked and inherit it.
SLOW_PACK = """
import sys, time
from shard_tools import images, pack
from shard_tools.cli import run_main
real = images.decode_gray
def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
images.decode_gray = slow
sys.exit(run_main(pack.main, sys.argv[1:]))
"""


def _src(root: Path, synth_src: Path, per_class: int = 4) -> Path:
    for c in CLASSES:
        (root / c / "images").mkdir(parents=True)
        for i in range(1, per_class + 1):
            shutil.copy(synth_src / c / "images" / f"{c}-{i}.png", root / c / "images")
    return root


def _beside(out: Path) -> list[str]:
    """OUT and any staging or swap folder pack may have left beside it."""
    return sorted(
        p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- --force


def test_force_never_deletes_a_folder_that_is_not_shards(synth_src: Path, tmp_path: Path, capsys):
    src = _src(tmp_path / "src", synth_src)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years of work")
    # The exact command: `pack SRC precious --force` used to delete precious/thesis.txt.
    assert run_main(main, [str(src), str(precious), "--force", "--no-progress"]) == EXIT_USAGE
    line = _one_line(capsys.readouterr().err)
    assert "--force would delete" in line and "thesis.txt" in line
    assert (precious / "thesis.txt").read_text() == "four years of work"
    assert _beside(precious) == ["precious"]


@pytest.mark.parametrize(
    "case", ["extra-file", "extra-folder", "foreign-manifest", "shards-without-manifest", "hidden-file"]
)
def test_force_refuses_a_shard_folder_with_anything_else_in_it(synth_src: Path, tmp_path: Path, case: str):
    src = _src(tmp_path / "src", synth_src)
    out = tmp_path / "out"
    pack(src, out, size=32, min_shards=1, progress=False)
    lost = {
        "extra-file": out / "notes.txt",
        "extra-folder": out / "train-000009.tar" / "inside.txt",  # a folder named like a shard
        "foreign-manifest": out / MANIFEST_NAME,
        "shards-without-manifest": out / "mine.txt",
        "hidden-file": out / ".notes",
    }[case]
    if case == "foreign-manifest":
        lost.write_text('{"name": "my project", "version": 3}')
    elif case == "shards-without-manifest":
        (out / MANIFEST_NAME).unlink()
        lost.write_text("mine")
    else:
        lost.parent.mkdir(exist_ok=True)
        lost.write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="--force would delete") as e:
        pack(src, out, size=32, min_shards=1, progress=False, force=True)
    assert str(lost if case != "extra-folder" else lost.parent) in str(e.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _beside(out) == ["out"]


def test_out_that_is_a_file_or_a_link_is_refused_even_with_force(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(InputError, match="is a file, not a folder"):
        pack(src, a_file, size=32, progress=False, force=True)
    assert a_file.read_text() == "mine"
    shards = tmp_path / "shards"
    pack(src, shards, size=32, min_shards=1, progress=False)
    link = tmp_path / "link"
    link.symlink_to(shards)
    with pytest.raises(InputError, match="is a symbolic link"):
        pack(src, link, size=32, progress=False, force=True)
    assert link.is_symlink() and (shards / MANIFEST_NAME).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    pack(src, empty, size=32, min_shards=1, progress=False)  # an empty folder needs no --force
    assert (empty / MANIFEST_NAME).is_file()


# ------------------------------------------------------------------------------------------ bad targets


@pytest.fixture
def unwritable(tmp_path: Path):
    """A folder nobody, root included, can create entries in (chmod for users, chattr +i for root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.slow
def test_unwritable_out_folder_is_one_line_exit_2(synth_src: Path, tmp_path: Path, unwritable: Path, capsys):
    src = _src(tmp_path / "src", synth_src)
    assert run_main(main, [str(src), str(unwritable / "out"), "--no-progress"]) == EXIT_USAGE
    line = _one_line(capsys.readouterr().err)
    assert f"OUT {unwritable / 'out'} cannot be written" in line and str(unwritable) in line
    assert list(unwritable.iterdir()) == []


def test_out_under_a_regular_file_is_one_line_exit_2(synth_src: Path, tmp_path: Path, capsys):
    src = _src(tmp_path / "src", synth_src)
    (tmp_path / "report.pdf").write_bytes(b"%PDF")
    out = tmp_path / "report.pdf" / "shards" / "cxr"
    assert run_main(main, [str(src), str(out), "--no-progress"]) == EXIT_USAGE
    line = _one_line(capsys.readouterr().err)
    assert f"{tmp_path / 'report.pdf'} is a file, not a folder" in line
    assert (tmp_path / "report.pdf").read_bytes() == b"%PDF"


def _png_bytes(out: Path) -> tuple[int, int]:
    """(bytes of all stored PNGs = the spill file's size, bytes of the single train shard)."""
    (shard,) = out.glob("train-*.tar")
    with tarfile.open(shard) as tar:
        pngs = sum(m.size for m in tar if m.name.endswith(".png"))
    return pngs, shard.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("where", ["spill", "shard"])
def test_full_disk_exits_1_with_one_line_and_keeps_the_previous_out(
    synth_src: Path, tmp_path: Path, where: str
):
    """A per-file size limit (`ulimit -f`, RLIMIT_FSIZE) makes writes fail with EFBIG, as a full disk does
    with ENOSPC (Python ignores SIGXFSZ, so the write raises instead of killing the process). Between
    the spill file's size and the shard's, the limit hits the shard written by a pool worker."""
    src = _src(tmp_path / "src", synth_src, per_class=6)
    out = tmp_path / "out"
    args = ["--size", "64", "--split", "1,0,0", "--min-shards", "1", "--workers", "2", "--no-progress"]
    pack(src, out, size=64, split=(1, 0, 0), min_shards=1, progress=False, seed=1)  # the previous OUT
    before = _snapshot(out)
    spill, shard = _png_bytes(out)
    assert spill < shard
    limit = spill // 2 if where == "spill" else (spill + shard) // 2

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(
        [sys.executable, "-m", "shard_tools.pack", str(src), str(out), *args, "--force"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size,
    )
    assert res.returncode == EXIT_FAILED, res.stderr
    # --split 1,0,0 (one shard, larger than the spill file) also warns, rightly, that val and test are empty.
    line = _one_line(
        "\n".join(x for x in res.stderr.splitlines() if "is empty (--split gives it 0)" not in x)
    )
    assert f"cannot write OUT {out}: File too large" in line and "free some space" in line
    assert _snapshot(out) == before and _beside(out) == ["out"]


# ---------------------------------------------------------------------------------------------- signals


def _start_slow_pack(src: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_PACK, str(src), str(out), "--size", "32", "--no-progress", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so the test can find (and kill) its workers
    )


def _wait_for_staging(out: Path, proc: subprocess.Popen, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.tmp-{proc.pid}-*"))
        if found and (found[0] / ".spill").exists():
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("pack never started writing")


def _group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_sigterm_mid_pack_cleans_up_and_exits_143(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src, per_class=25)  # 100 images, ~2.5 s with two slow workers
    out = tmp_path / "out"
    pack(src, out, size=32, min_shards=1, progress=False)  # the previous OUT, replaced only on success
    before = _snapshot(out)
    proc = _start_slow_pack(src, out, "--workers", "2", "--force")
    _wait_for_staging(out, proc)
    time.sleep(0.3)  # well inside decoding
    proc.send_signal(signal.SIGTERM)  # to pack alone, as `kill <pid>` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SIGTERM, err
    assert "stopped by SIGTERM; nothing half-written was left behind" in _one_line(err)
    assert _snapshot(out) == before and _beside(out) == ["out"]
    assert _group_members(proc.pid) == []  # the decode workers are gone too


@pytest.mark.slow
def test_stale_staging_of_a_killed_pack_is_removed_by_the_next_one(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src, per_class=25)
    out = tmp_path / "out"
    proc = _start_slow_pack(src, out, "--workers", "1")
    staging = _wait_for_staging(out, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: the staging folder stays
    proc.communicate(timeout=60)
    # The killed pack's lock file stays too (no handler ran); it holds no lock once its process is gone,
    # and the next pack through the command line takes it again and removes it at the end.
    lock = lock_path_beside(out).name
    assert staging.is_dir() and _beside(out) == sorted([lock, staging.name])
    # Another pack of another OUT in the same folder leaves it alone; the next pack of OUT removes it.
    pack(src, tmp_path / "other", size=32, min_shards=1, progress=False)
    assert staging.is_dir()
    assert run_main(main, [str(src), str(out), "--size", "32", "--min-shards", "1", "--no-progress"]) == 0
    assert not staging.exists() and _beside(out) == ["out"]
    assert (out / MANIFEST_NAME).is_file()


def test_a_live_packs_staging_folder_is_left_alone(synth_src: Path, tmp_path: Path):
    src = _src(tmp_path / "src", synth_src, per_class=1)
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getppid()}-abcdef"  # a running process's (this test's parent)
    live.mkdir()
    pack(src, out, size=32, min_shards=1, progress=False)
    assert live.is_dir()
