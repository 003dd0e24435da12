"""`python -m trainer.bench.data`: a tiny real run (64 Fashion-MNIST images, 32 px crops, 1 repeat).

Checks the JPEG folder against the IDX files read here independently, that both pipelines yield
every image of an epoch once with the folder's labels and batches of the same shape, dtype, layout
and value range, and that the printed table and the JSON carry the measured fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FMNIST, ROOT, cli_env
from trainer.bench import data as bench_data

N, SOURCE_PX, SIZE, BATCH = 64, 48, 32, 16


def idx_payload(path: Path, header: int) -> np.ndarray:
    """Bytes after the IDX header (written here, not with trainer.data.sources)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: `make setup` installs the dataset-fashion-mnist package")
    tmp = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run = bench_data.main(
            [
                "--work",
                str(tmp / "work"),
                "--images",
                str(N),
                "--source-px",
                str(SOURCE_PX),
                "--size",
                str(SIZE),
                "--batch-size",
                str(BATCH),
                "--repeats",
                "1",
                "--json",
                str(tmp / "result.json"),
            ]
        )
    labels = idx_payload(FMNIST / "train-labels-idx1-ubyte.gz", 8)[:N].astype(np.int64)
    images = idx_payload(FMNIST / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:N]
    return {
        "work": tmp / "work",
        "result": run.result,
        "loaders": run.loaders,
        "json": json.loads((tmp / "result.json").read_text()),
        "table": out.getvalue(),
        "labels": labels,
        "images": images,
    }


def folder_histogram(train_dir: Path) -> np.ndarray:
    """Images per class folder, in sorted folder order (= label order of both pipelines)."""
    return np.array([len(list(d.glob("*.jpg"))) for d in sorted(p for p in train_dir.iterdir() if p.is_dir())])


def test_jpeg_folder_holds_the_real_images_in_their_classes(tiny) -> None:
    from PIL import Image

    train = tiny["work"] / "jpeg" / "train"
    labels, images = tiny["labels"], tiny["images"]
    present = np.unique(labels)
    dirs = sorted(p.name for p in train.iterdir())
    assert [int(d[:2]) for d in dirs] == present.tolist()
    assert folder_histogram(train).tolist() == np.bincount(labels)[present].tolist()
    lo, hi = round(0.75 * SOURCE_PX), round(1.25 * SOURCE_PX)
    sizes = set()
    for f in sorted(train.glob("*/*.jpg")):
        i = int(f.stem)
        assert int(f.parent.name[:2]) == labels[i]
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert lo <= im.width <= hi and lo <= im.height <= hi
            sizes.add(im.size)
            # Back to 28x28 gray: must be Fashion-MNIST image i (up to tint, scaling and JPEG loss).
            small = np.asarray(im.convert("L").resize((28, 28), Image.Resampling.BOX), dtype=np.float64)
        assert np.corrcoef(small.ravel(), images[i].ravel().astype(np.float64))[0, 1] > 0.9, f.name
    assert len(sizes) > N // 2  # sizes and aspect ratios vary
    val = list((tiny["work"] / "jpeg" / "val").glob("*/*.jpg"))
    assert len(val) == 10 and {int(f.parent.name[:2]) for f in val} <= set(present.tolist())


def check_epoch(loader, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Labels of one epoch, after checking every batch's format and pixel range."""
    labels = []
    for x, y in loader:
        assert x.shape == (BATCH, 3, SIZE, SIZE) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)  # the default --layout
        assert y.shape == (BATCH,) and y.dtype == torch.int64
        px = x * std + mean  # undo the normalization: uint8 pixel values again
        assert px.min() > -0.01 and px.max() < 255.01
        assert (px - px.round()).abs().max() < 0.01
        assert px.std() > 10  # real content, not a constant image
        labels.append(y.numpy())
    return np.concatenate(labels)


def test_pipelines_yield_every_image_once_with_equal_batches(tiny) -> None:
    work, loaders = tiny["work"], tiny["loaders"]  # the very pipelines the benchmark timed
    meta = json.loads((work / "ffcv-jpg" / "meta.json").read_text())
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    hist = folder_histogram(work / "jpeg" / "train")
    assert hist.sum() == N and N % BATCH == 0  # drop_last drops nothing: every image, once
    assert list(loaders) == ["tv-uint8", "tv-float", "ffcv"]
    classes = sorted(p.name for p in (work / "jpeg" / "train").iterdir())
    assert loaders["tv-uint8"].dataset.classes == classes and len(classes) == meta["num_classes"]
    for name, loader in loaders.items():
        orders = []
        for _ in range(2):
            got = check_epoch(loader, mean, std)
            assert np.bincount(got, minlength=len(hist)).tolist() == hist.tolist(), name
            orders.append(got)
        assert not np.array_equal(*orders), name  # reshuffled every epoch
        if name != "ffcv":
            assert len(loader.worker_pids()) == 2


def test_table_and_json_report_the_measurements(tiny) -> None:
    result, js, table = tiny["result"], tiny["json"], tiny["table"]
    assert js == json.loads(json.dumps(result))
    rows = {r["pipeline"]: r for r in js["results"]}
    assert list(rows) == ["ffcv", "tv-uint8", "tv-float"]
    for r in rows.values():
        assert r["images"] == N  # one epoch of 64 images in batches of 16
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
        assert r["cpu_ms_per_image"] > 0 and r["warmup_epoch_s"] > 0 and r["threads"] == 2
        assert f"\n{r['pipeline']:<10} " in table
        assert len(r["rounds_images_per_s"]) == 1 and r["images_per_s"] == max(r["rounds_images_per_s"])
    fastest = max(("tv-uint8", "tv-float"), key=lambda n: rows[n]["images_per_s"])
    cheapest = min(rows[n]["cpu_ms_per_image"] for n in ("tv-uint8", "tv-float"))
    assert js["cpu_ratio"] == pytest.approx(cheapest / rows["ffcv"]["cpu_ms_per_image"])
    assert f"{js['cpu_ratio']:.2f}x less CPU time" in table
    assert js["fastest_torchvision"] == fastest
    assert js["ratio"] == pytest.approx(rows["ffcv"]["images_per_s"] / rows[fastest]["images_per_s"])
    assert js["target_met"] == (js["ratio"] >= 3.0)
    assert f"{js['ratio']:.2f}x" in table
    # one round: its ratio is the best-round ratio, and the table prints it
    assert js["round_ratios"] == [pytest.approx(js["ratio"])]
    assert f"FFCV / {fastest} {js['round_ratios'][0]:.2f}" in table
    c, m = js["config"], js["machine"]
    assert (c["images"], c["size"], c["batch_size"], c["workers"], c["repeats"]) == (N, SIZE, BATCH, 2, 1)
    assert c["source_px"] == [36, 60] and c["write_mode"] == "jpg" and c["reused"] is False
    assert 0 < c["jpeg_kb_per_image"] < 20 and 0 < c["ffcv_kb_per_image"] < 20
    assert m["torch"] == torch.__version__ and m["cpu_count"] >= 1 and len(m["load_before"]) == 3
    assert m["cpu"] and m["ffcv"] != "not installed"


def test_work_folder_is_reused_rebuilt_or_refused(tmp_path: Path) -> None:
    params = bench_data.FolderParams(
        images=20, val_images=10, source_px=32, jpeg_quality=90, seed=0, source=str(FMNIST)
    )
    first = bench_data.prepare(tmp_path / "w", params)
    some = next((tmp_path / "w" / "jpeg" / "train").glob("*/*.jpg"))
    stamp = some.stat().st_mtime_ns
    again = bench_data.prepare(tmp_path / "w", params)
    assert not first.reused and again.reused and some.stat().st_mtime_ns == stamp
    other = bench_data.prepare(tmp_path / "w", dataclasses.replace(params, jpeg_quality=50))
    assert not other.reused and other.meta["jpeg_quality"] == 50
    assert json.loads((tmp_path / "w" / "params.json").read_text())["jpeg_quality"] == 50
    # An interrupted build leaves the placeholder params.json: rebuilt, not reused and not refused.
    (tmp_path / "w" / "params.json").write_text('{"incomplete": true}')
    next((tmp_path / "w" / "jpeg" / "train").glob("*/*.jpg")).unlink()
    redone = bench_data.prepare(tmp_path / "w", params)
    assert not redone.reused and len(list((tmp_path / "w" / "jpeg" / "train").glob("*/*.jpg"))) == 20
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--work .*foreign: not empty and has no params.json"):
        bench_data.prepare(tmp_path / "foreign", params)
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "x"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^--workers: 0; expected an integer >= 1$"):
        bench_data.main(["--work", str(tmp_path), "--workers", "0"])
    with pytest.raises(ValueError, match=r"^--batch-size: 128 is larger than --images 64;"):
        bench_data.main(["--work", str(tmp_path), "--images", "64"])
    with pytest.raises(ValueError, match=r"^--jpeg-quality: 101; expected an integer in 1\.\.100$"):
        bench_data.main(["--work", str(tmp_path), "--jpeg-quality", "101"])
    assert not any(tmp_path.iterdir())
    # The command line turns the ValueError into one line and exit status 2, like `python -m trainer`.
    p = subprocess.run(
        [sys.executable, "-m", "trainer.bench.data", "--images", "0"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (p.returncode, p.stderr.strip()) == (2, "error: --images: 0; expected an integer in 1..60000")
