"""Your own task by path (issue 10): an ImageFolder tree of real PNGs through prepare -> train --shots -> benchmark,
the three layouts against the arrays they were written from, and every bad input as one line, exit 2."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pyro_tvc.cli import main
from pyro_tvc.data import EMBEDDED_DIR, images_to_tensor
from pyro_tvc.data.custom import CustomTaskError, load_custom
from pyro_tvc.data.targets import load_target

PER_CLASS = {"train": 40, "test": 20}


def _digits():
    with np.load(EMBEDDED_DIR / "digits.npz") as d:
        return ([str(c) for c in d["classes"]], d["train_images"], d["train_labels"], d["test_images"],
                d["test_labels"])


def split_arrays(dataset):
    """Every item of a split, read one by one through the Dataset protocol: (images [N, 3, S, S], labels [N])."""
    items = [dataset[i] for i in range(len(dataset))]
    return np.stack([np.asarray(x) for x, _ in items]), np.asarray([int(y) for _, y in items])


def write_image_folder(root, per_class=PER_CLASS, classes_kept=10):
    """Real scanned digits of the shipped `digits` set as PNG files: root/{train,test}/<class>/<i>.png."""
    classes, xtr, ytr, xte, yte = _digits()
    for split, (x, y) in {"train": (xtr, ytr), "test": (xte, yte)}.items():
        for c in range(classes_kept):
            folder = root / split / f"digit {classes[c]}"
            folder.mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(y == c)[:per_class[split]]):
                Image.fromarray(x[idx]).save(folder / f"{i}.png")
    return root


def test_image_folder_reads_back_the_pixels_it_was_written_from(tmp_path):
    root = write_image_folder(tmp_path / "scans", {"train": 5, "test": 3}, classes_kept=3)
    classes, xtr, ytr, _, _ = _digits()
    task = load_custom(root, image_size=32, seed=0)
    assert task.name == "scans" and task.classes == ["digit 0", "digit 1", "digit 2"]
    images, labels = (np.concatenate([split_arrays(getattr(task, s))[k] for s in ("train", "val")]) for k in (0, 1))
    assert len(labels) == 15 and len(task.test) == 9 and np.bincount(labels).tolist() == [5, 5, 5]
    expected = images_to_tensor(np.stack([xtr[np.flatnonzero(ytr == c)[i]] for c in range(3) for i in range(5)]))
    # same multiset of images (order differs after the val split): compare sorted per-image sums
    assert np.allclose(np.sort(images.reshape(15, -1).sum(1)), np.sort(expected.numpy().reshape(15, -1).sum(1)),
                       atol=1e-3)


def test_npz_and_csv_layouts_match_the_folder(tmp_path):
    root = write_image_folder(tmp_path / "scans", {"train": 6, "test": 2}, classes_kept=2)
    rows = [{"path": str(p.relative_to(root)), "label": p.parent.name, "split": p.parts[-3]}
            for p in sorted(root.rglob("*.png"))]
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    folder = load_custom(root, 32)
    from_csv = load_custom(root / "labels.csv", 32)
    assert from_csv.classes == folder.classes and len(from_csv.test) == len(folder.test) == 4
    assert np.allclose(split_arrays(from_csv.test)[0], split_arrays(folder.test)[0])
    x = np.stack([np.asarray(Image.open(root / r["path"])) for r in rows if r["split"] == "train"])
    y = np.array([folder.classes.index(r["label"]) for r in rows if r["split"] == "train"])
    np.savez(tmp_path / "mine.npz", classes=np.array(folder.classes), train_images=x, train_labels=y,
             test_images=x[:2], test_labels=y[:2])
    npz = load_custom(tmp_path / "mine.npz", 32)
    assert npz.name == "mine" and len(npz.train) + len(npz.val) == 12 and len(npz.test) == 2


def test_shots_are_stratified_and_val_never_holds_a_shot(tmp_path):
    root = write_image_folder(tmp_path / "scans", {"train": 12, "test": 2}, classes_kept=3)
    data = load_target(str(root), seed=3, shots=4)
    y = data.splits["train"][1].numpy()
    assert np.bincount(y).tolist() == [4, 4, 4] and data.choices["val_source"] == "held out of train"
    train = {tuple(v) for v in data.splits["train"][0].reshape(12, -1)[:, :64].numpy().round(4)}
    val = {tuple(v) for v in data.splits["val"][0].reshape(len(data.splits["val"][1]), -1)[:, :64].numpy().round(4)}
    assert not train & val
    with pytest.raises(ValueError, match=r"--shots 20 is larger than class 0 \('digit 0'\)'s 11 training images"):
        load_target(str(root), shots=20)


def _bad_cases(tmp_path):
    no_classes = tmp_path / "flat"
    no_classes.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(no_classes / "a.png")
    empty_class = write_image_folder(tmp_path / "emptycls", {"train": 3, "test": 2}, classes_kept=2)
    (empty_class / "train" / "digit 9").mkdir()
    (empty_class / "test" / "digit 9").mkdir()
    bad_file = write_image_folder(tmp_path / "badfile", {"train": 3, "test": 2}, classes_kept=2)
    (bad_file / "train" / "digit 0" / "notes.txt").write_text("not an image")
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\nnope/1.png,cat\n")
    return {"no class sub-folders": (no_classes, "no class sub-folders"),
            "empty class": (empty_class, "class 'digit 9' has no images"),
            "non-image file": (bad_file, "notes.txt: not a readable image"),
            "csv missing path": (missing, "line 2: image"),
            "no such folder": (tmp_path / "nowhere/", "no such folder or file")}


def test_bad_custom_tasks_are_refused_naming_the_file(tmp_path):
    for case, (path, message) in _bad_cases(tmp_path).items():
        with pytest.raises((CustomTaskError, ValueError), match=message.replace("(", r"\(")):
            load_custom(path, 32)
    bad = tmp_path / "badfile"
    assert load_custom(bad, 32, skip_bad_images=True).skipped == 1


@pytest.mark.slow
def test_bad_custom_tasks_exit_2_one_line_nothing_written(prepared, tmp_path, capsys):
    for case, (path, message) in _bad_cases(tmp_path).items():
        for argv in (["prepare", "--out", str(tmp_path / "art"), "--tasks", str(path)],
                     ["train", "--artifacts", str(prepared), "--target", str(path), "--out", str(tmp_path / "run")]):
            assert main(argv + ["--quiet", "--device", "cpu"]) == 2, (case, argv[0])
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and message in err[0], (case, argv[0], err)
            assert not (tmp_path / "art").exists() and not (tmp_path / "run").exists()
    root = write_image_folder(tmp_path / "few", {"train": 6, "test": 2}, classes_kept=2)
    assert main(["train", "--artifacts", str(prepared), "--target", str(root), "--shots", "16", "--out",
                 str(tmp_path / "run"), "--quiet", "--device", "cpu"]) == 2
    assert "--shots 16 is larger than class 0" in capsys.readouterr().err


@pytest.mark.slow
def test_own_image_folder_through_prepare_train_and_benchmark(prepared, tmp_path):
    """The issue's acceptance: real PNGs under a new name; prepare -> train --shots 16 -> benchmark; composing the
    prepared vectors beats zero-shot on the folder's test split."""
    art = tmp_path / "art"
    shutil.copytree(prepared, art)
    root = write_image_folder(tmp_path / "my_scans")
    assert main(["prepare", "--out", str(art), "--tasks", str(root), "--finetune-steps", "5", "--batch-size", "32",
                 "--quiet", "--device", "cpu"]) == 0
    table = json.loads((art / "table.json").read_text())
    assert [r["task"] for r in table["rows"]][0] == "my_scans" and (art / "heads" / "my_scans.safetensors").exists()
    run = tmp_path / "run"
    assert main(["train", "--artifacts", str(art), "--target", str(root), "--shots", "16", "--tasks", "mnist",
                 "eurosat5", "--guide", "point", "--epochs", "4", "--out", str(run), "--quiet", "--device",
                 "cpu"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["data"]["shots"] == 16 and res["single_model_accuracy"] > res["zero_shot_accuracy"], res
    bench = tmp_path / "bench"
    assert main(["benchmark", "--artifacts", str(art), "--out", str(bench), "--protocols", "target", "--targets",
                 str(root), "--pool", "mnist", "eurosat5", "--methods", "zero_shot", "task_arithmetic", "atlas",
                 "--shots", "16", "--seeds", "1", "--quiet", "--device", "cpu"]) == 0
    import pandas as pd

    df = pd.read_csv(bench / "results.csv")
    acc = df[(df.metric == "accuracy") & (df.task == "my_scans")].set_index("method")["value"]
    assert acc["atlas"] > acc["zero_shot"], acc.to_dict()


def test_feature_cache_hits_only_for_the_same_model_and_pixels(tmp_path):
    import torch

    from pyro_tvc.evaluation import encode_cached

    calls = []

    class Encoder(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x.flatten(1)[:, :4] * 2

    images = torch.randn(5, 3, 4, 4)
    first = encode_cached(Encoder(), images, "theta-A", tmp_path)
    again = encode_cached(Encoder(), images, "theta-A", tmp_path)
    assert calls == [5] and torch.equal(first, again) and torch.equal(first, images.flatten(1)[:, :4] * 2)
    encode_cached(Encoder(), images, "theta-B", tmp_path)  # another theta_0: a miss
    changed = images.clone()
    changed[0, 0, 0, 0] += 1e-3
    encode_cached(Encoder(), changed, "theta-A", tmp_path)  # another pixel: a miss
    assert calls == [5, 5, 5] and len(list(tmp_path.glob("*.pt"))) == 3
    for f in tmp_path.glob("*.pt"):
        f.write_bytes(b"damaged")
    for _ in range(2):
        encode_cached(Encoder(), images, "theta-A", tmp_path)
    assert len(calls) == 4  # the damaged file was recomputed once, then hit


def test_more_bad_layouts_and_a_seed_independent_test_split(tmp_path):
    flat = tmp_path / "flat"
    for c in range(2):
        (flat / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8), 20 * i + c, np.uint8)).save(flat / f"c{c}" / f"{i}.png")
    a, b = load_custom(flat, 8, seed=0), load_custom(flat, 8, seed=5)
    assert np.array_equal(split_arrays(a.test)[0], split_arrays(b.test)[0])  # the test split never moves with the run's seed
    no_test = write_image_folder(tmp_path / "imagenet_style", {"train": 2, "test": 2}, classes_kept=2)
    (no_test / "test").rename(no_test / "val")
    with pytest.raises(CustomTaskError, match="expected train/ and test/"):
        load_custom(no_test, 32)
    only_test = tmp_path / "only_test.csv"
    only_test.write_text(f"path,label,split\n{next(no_test.rglob('*.png'))},x,test\n")
    with pytest.raises(CustomTaskError, match="no train rows"):
        load_custom(only_test, 32)
    np.savez(tmp_path / "bad.npz", classes=np.array(["a", "b"]), train_images=np.zeros((2, 8, 8), np.uint8),
             train_labels=np.array([0, 2]), test_images=np.zeros((1, 8, 8), np.uint8), test_labels=np.array([0]))
    with pytest.raises(CustomTaskError, match=r"train_labels must be 2 integers in \[0, 2\)"):
        load_custom(tmp_path / "bad.npz", 8)

