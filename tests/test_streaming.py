"""Streamed splits (issue 10, item 3): a folder's images are decoded when read, never held as one tensor.

References are independent of the streaming code: each PNG decoded here with PIL and normalised by hand, and a run
whose splits fit in memory (the same files, the same seeds) for the end-to-end comparison."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_tvc.cli import main
from pyro_tvc.data import CLIP_MEAN, CLIP_STD
from pyro_tvc.data.custom import load_custom
from pyro_tvc.data.streaming import LazyImages, fit_in_memory, memory_budget_bytes, take
from pyro_tvc.data.targets import load_target


def _by_hand(path, size):
    """PIL decode, bicubic shorter side + centre crop only when needed, CLIP normalisation: written out here."""
    im = Image.open(path).convert("RGB")
    if im.size != (size, size):
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(((x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1))


@pytest.fixture
def folder(tmp_path):
    """Two classes of 12 non-square RGB images with distinct pixels (so a wrong row is visible)."""
    rng = np.random.RandomState(0)
    root = tmp_path / "shapes"
    for c in ("round", "square"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.randint(0, 256, (20, 28, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_lazy_rows_equal_the_files_decoded_by_hand(folder):
    task = load_custom(folder, 16, seed=0)
    lazy = LazyImages(task.test)
    ref = torch.stack([_by_hand(p, 16) for p in task.test.paths])
    assert lazy.shape == ref.shape and len(lazy) == len(ref) == 4
    assert torch.allclose(lazy[torch.tensor([3, 0, 3])], ref[[3, 0, 3]], atol=1e-5)
    assert torch.allclose(lazy[1:5:2], ref[1:5:2], atol=1e-5) and torch.allclose(lazy[-1], ref[-1], atol=1e-5)
    assert torch.allclose(lazy[torch.tensor([True, False] * 2)], ref[::2], atol=1e-5)
    assert torch.allclose(torch.cat(list(lazy.batches(batch_size=4))), ref, atol=1e-5)
    sub = take(lazy, [3, 2])
    assert isinstance(sub, LazyImages) and torch.allclose(sub[:], ref[[3, 2]], atol=1e-5)
    mixed = torch.cat([sub, ref[:1]])  # lazy + in-memory parts, as task addition concatenates tasks
    assert isinstance(mixed, LazyImages) and torch.allclose(mixed[[0, 1, 2]], ref[[3, 2, 0]], atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        lazy[[4]]


def test_memory_budget_decides_what_is_streamed(folder, monkeypatch):
    monkeypatch.setenv("PYRO_TVC_IMAGE_MEMORY_MB", "0")
    streamed = load_target(str(folder), seed=1, image_size=16)
    assert all(isinstance(x, LazyImages) for x, _ in streamed.splits.values())
    assert streamed.choices["streamed_splits"] == ["test", "train", "val"]
    monkeypatch.delenv("PYRO_TVC_IMAGE_MEMORY_MB")
    held = load_target(str(folder), seed=1, image_size=16)
    assert held.choices["streamed_splits"] == [] and memory_budget_bytes() == 1024 * 2**20
    for k in ("train", "val", "test"):
        assert isinstance(held.splits[k][0], torch.Tensor)
        assert torch.equal(fit_in_memory(streamed.splits[k][0]), held.splits[k][0])
        assert torch.equal(streamed.splits[k][1], held.splits[k][1])
    monkeypatch.setenv("PYRO_TVC_IMAGE_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match="PYRO_TVC_IMAGE_MEMORY_MB='lots'"):
        memory_budget_bytes()


def test_feature_cache_of_streamed_files_misses_when_a_file_changes(folder, tmp_path):
    from pyro_tvc.evaluation import encode_cached

    calls = []

    class Encoder(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x.mean(dim=(2, 3))

    lazy = LazyImages(load_custom(folder, 16, seed=0).test)
    cache = tmp_path / "features"
    first = encode_cached(Encoder(), lazy, "theta", cache)
    assert torch.allclose(first, lazy[:].mean(dim=(2, 3)), atol=1e-6)
    assert torch.equal(encode_cached(Encoder(), lazy, "theta", cache), first) and sum(calls) == 4
    changed = lazy.dataset.paths[0]
    Image.fromarray(np.zeros((20, 28, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new file, with a modification time of its own
    again = encode_cached(Encoder(), lazy, "theta", cache)
    assert sum(calls) == 8 and not torch.allclose(again[0], first[0])
    draws = []
    for _ in range(2):  # a cold (miss) and a warm (hit) encoding leave the global RNG alike: same guide init
        torch.manual_seed(0)
        encode_cached(Encoder(), LazyImages(load_custom(folder, 16, seed=1).test), "theta", tmp_path / "fresh")
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and sum(calls) == 12


@pytest.mark.slow
def test_streamed_train_and_benchmark_equal_the_in_memory_runs(prepared, tmp_path, monkeypatch):
    """Same files, seeds and options: streaming every split changes nothing in train's or benchmark's results."""
    from tests.test_custom_tasks import write_image_folder

    root = write_image_folder(tmp_path / "scans", {"train": 12, "test": 6}, classes_kept=4)
    results = {}
    for mode, budget in (("held", "1024"), ("streamed", "0")):
        monkeypatch.setenv("PYRO_TVC_IMAGE_MEMORY_MB", budget)
        art = tmp_path / f"art-{mode}"
        shutil.copytree(prepared, art)  # its own feature cache: the streamed run must encode, not hit
        run, bench = tmp_path / f"run-{mode}", tmp_path / f"bench-{mode}"
        assert main(["train", "--artifacts", str(art), "--target", str(root), "--tasks", "mnist", "eurosat5",
                     "--epochs", "1", "--eval-samples", "2", "--out", str(run), "--quiet", "--device", "cpu"]) == 0
        assert main(["benchmark", "--artifacts", str(art), "--out", str(bench), "--protocols", "target", "--targets",
                     str(root), "--pool", "mnist", "eurosat5", "--methods", "zero_shot", "atlas", "--seeds", "1",
                     "--quiet", "--device", "cpu"]) == 0
        res = json.loads((run / "results.json").read_text())
        recs = json.loads((bench / "results.json").read_text())["records"]
        results[mode] = (res, {(r["method"], r["metric"]): r["value"] for r in recs if r["metric"] == "accuracy"})
    held, streamed = results["held"], results["streamed"]
    assert held[0]["data"]["streamed_splits"] == [] and streamed[0]["data"]["streamed_splits"] == ["test", "train",
                                                                                                   "val"]
    for key in ("mc_accuracy", "single_model_accuracy", "zero_shot_accuracy", "mc_nll"):
        assert held[0][key] == pytest.approx(streamed[0][key], abs=1e-6), key
    assert held[1] == pytest.approx(streamed[1], abs=1e-6) and held[1]


@pytest.mark.slow
def test_real_sets_from_data_root_through_train_and_benchmark(prepared, tmp_path):
    """`train` and `benchmark` read real sets prepared with --data-root (issue 10: "train only reads the embedded
    sets"): two torchvision-layout stand-ins built from the shipped digits (RESISC45 as resisc45/<class>/,
    EuroSAT as eurosat/2750/<class>/). Reference: prepare's own zero-shot accuracy of the same test split."""
    from tests.test_custom_tasks import _digits

    classes, x, y, _, _ = _digits()
    data = tmp_path / "data"
    for folder, kept in ((data / "resisc45", 4), (data / "eurosat" / "2750", 3)):
        for c in range(kept):
            (folder / f"digit {classes[c]}").mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(y == c)[:25]):
                Image.fromarray(x[idx]).resize((48, 48)).save(folder / f"digit {classes[c]}" / f"{i}.png")
    art = tmp_path / "art"
    shutil.copytree(prepared, art)
    assert main(["prepare", "--out", str(art), "--data-root", str(data), "--tasks", "RESISC45", "EuroSAT",
                 "--finetune-steps", "3", "--batch-size", "16", "--quiet", "--device", "cpu"]) == 0
    zero_shot = {r["task"]: r["zero_shot"] for r in json.loads((art / "table.json").read_text())["rows"]}
    run = tmp_path / "run"
    assert main(["train", "--artifacts", str(art), "--data-root", str(data), "--target", "RESISC45", "--tasks",
                 "EuroSAT", "--epochs", "1", "--eval-samples", "2", "--out", str(run), "--quiet",
                 "--device", "cpu"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["zero_shot_accuracy"] == pytest.approx(zero_shot["RESISC45"], abs=0.01)
    bench = tmp_path / "bench"
    assert main(["benchmark", "--artifacts", str(art), "--data-root", str(data), "--out", str(bench), "--protocols",
                 "target", "addition", "--targets", "RESISC45", "--pool", "EuroSAT", "RESISC45",
                 "--selection-per-task", "10", "--methods", "zero_shot", "task_arithmetic", "--seeds", "1", "--quiet", "--device", "cpu"]) == 0
    recs = json.loads((bench / "results.json").read_text())["records"]
    zs = {(r["protocol"], r["task"]): r["value"] for r in recs if r["method"] == "zero_shot" and r["metric"] == "accuracy"}
    assert zs[("target", "RESISC45")] == pytest.approx(zero_shot["RESISC45"], abs=0.01)
    assert zs[("addition", "EuroSAT")] == pytest.approx(zero_shot["EuroSAT"], abs=0.01)
    assert main(["train", "--artifacts", str(art), "--target", "RESISC45", "--data-root", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "r2").exists()


def test_truncated_jpeg_is_skipped_or_refused_at_loading_and_real_errors_name_the_file(folder, tmp_path):
    """A truncated JPEG passes PIL's verify(); it must still be found when the folder is loaded (counted with
    --skip-bad-images, refused naming the file without), never later in the middle of a run."""
    import io

    from pyro_tvc.data.custom import CustomTaskError
    from pyro_tvc.data.streaming import ImageFiles

    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = folder / "round" / "cut.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert load_custom(folder, 16, skip_bad_images=True).skipped == 1
    with pytest.raises(CustomTaskError, match="cut.jpg: not a readable image"):
        load_custom(folder, 16)

    class Listed(torch.utils.data.Dataset):  # a torchvision-style dataset listing its files in `samples`
        samples = [(str(bad), 0)]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise OSError("image file is truncated")

    with pytest.raises(ValueError, match=r"cut.jpg: not a readable image \(OSError"):
        LazyImages(Listed(), identity="x")[[0]]
    with pytest.raises(TypeError, match="rows only"):
        torch.cat([LazyImages(ImageFiles([], 4)), torch.zeros(0, 3, 4, 4)], dim=1)
