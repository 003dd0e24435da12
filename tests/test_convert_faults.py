"""`convert` when the output cannot be written: a full disk, a read-only file system, a path under a file.

Each case runs the real CLI (FFCV's writer with its worker processes) in a subprocess; the full and read-only
file systems are real tmpfs mounts made inside a private mount namespace (`unshare -rm`, util-linux), so nothing
outside the test's own process tree sees them. Each must end within seconds (FFCV's writer waits forever for a
worker that died: the converter's watchdog turns that into an error), print one line naming --out and the
cause, exit 2 (permanent: a full disk is not an outage a restart cures), and leave no file behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import FMNIST, ROOT, cli_env

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="needs dataset-fashion-mnist")


def _in_namespace(script: str, mount: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `script` (sh) in a private mount namespace with a tmpfs of options `mount` at /mnt."""
    assert shutil.which("unshare"), "util-linux unshare is needed for the file-system fault tests"
    wrapped = f"mount -t tmpfs -o {mount} tmpfs /mnt && {script}"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", wrapped],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _convert_cmd(out: str, limit: int, workers: int) -> str:
    return (
        f"{sys.executable} -m trainer convert --dataset fashion-mnist --source {FMNIST} --out {out} "
        f"--limit {limit} --num-workers {workers}; echo status=$?; ls -A {out} 2>/dev/null | sed 's/^/left:/'"
    )


def _error_lines(stderr: str) -> list[str]:
    """stderr without FFCV's progress bar (carriage-return separated redraws)."""
    lines = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [x for x in lines if x.strip() and "it/s]" not in x and "?it/s" not in x]


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_is_one_line_exit_2_without_leftovers(workers):
    # 2,000 raw 28x28x3 images need ~4.7 MB; the disk holds 1 MiB.
    res = _in_namespace(_convert_cmd("/mnt/ds", 2000, workers), "size=1m")
    assert "status=2" in res.stdout, (res.stdout, res.stderr[-2000:])
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("error: --out /mnt/ds: ") and "ENOSPC" in lines[0] and "free some space" in lines[0]
    assert "Traceback" not in res.stderr
    assert "left:" not in res.stdout, res.stdout  # no .train.beton.tmp-* filling the disk, no meta.json


def test_read_only_output_is_one_line_exit_2():
    res = _in_namespace(_convert_cmd("/mnt/ds", 20, 1), "size=1m,ro")
    assert "status=2" in res.stdout, (res.stdout, res.stderr[-2000:])
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: --out /mnt/ds: ") and "EROFS" in lines[0], res.stderr


def test_output_under_a_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "convert",
            "--dataset",
            "fashion-mnist",
            "--source",
            FMNIST,
            "--out",
            str(tmp_path / "afile" / "ds"),
            "--limit",
            "20",
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and "ENOTDIR" in lines[0] and str(tmp_path / "afile" / "ds") in lines[0], res.stderr
    assert (tmp_path / "afile").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_disk_full_in_a_worker_thread_raises_instead_of_hanging():
    """convert() called from a thread other than the main one (a library user): the watchdog cannot use a
    signal there and raises into the converting thread instead; the caller gets the ValueError."""
    code = (
        "import threading, sys\n"
        "from trainer.data.convert import convert\n"
        "out = {}\n"
        "def run():\n"
        "    try:\n"
        f"        convert('fashion-mnist', {str(FMNIST)!r}, '/mnt/ds', limit=2000, num_workers=1)\n"
        "    except ValueError as e:\n"
        "        out['e'] = str(e)\n"
        "t = threading.Thread(target=run); t.start(); t.join(60)\n"
        "print('alive' if t.is_alive() else 'ERR ' + out.get('e', 'none'))\n"
    )
    script = f"{sys.executable} -c \"$CODE\"; ls -A /mnt/ds | sed 's/^/left:/'"
    res = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs /mnt && {script}"],
        cwd=ROOT,
        env={**cli_env(), "CODE": code},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ERR --out /mnt/ds: " in res.stdout and "ENOSPC" in res.stdout, (res.stdout, res.stderr[-2000:])
    assert "left:" not in res.stdout
