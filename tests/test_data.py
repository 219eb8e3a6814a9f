import hashlib

import numpy as np
import pytest
import torch

from pyro_tvc.data import (EMBEDDED_DIR, EMBEDDED_TASKS, DatasetNotFoundError, embedded_manifest, load_embedded,
                           load_real, stratified_val_indices)


def test_manifest_checksums_match_shipped_files():
    manifest = embedded_manifest()
    assert set(manifest["tasks"]) == set(EMBEDDED_TASKS)
    for task, info in manifest["tasks"].items():
        digest = hashlib.sha256((EMBEDDED_DIR / f"{task}.npz").read_bytes()).hexdigest()
        assert digest == info["sha256"], task


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_embedded_task_splits(task):
    s = load_embedded(task)
    info = embedded_manifest()["tasks"][task]
    assert s.num_classes == info["n_classes"] == len(set(s.classes))
    assert len(s.train) + len(s.val) == info["n_train"] and len(s.test) == info["n_test"]
    for split in (s.train, s.val, s.test):
        x, y = split.tensors
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        assert int(y.min()) >= 0 and int(y.max()) < s.num_classes
    # every class is present in val (stratified carve-out)
    assert set(s.val.tensors[1].tolist()) == set(range(s.num_classes))


def test_val_split_is_deterministic_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr1, va1 = stratified_val_indices(labels, 0.1, seed=3)
    tr2, va2 = stratified_val_indices(labels, 0.1, seed=3)
    assert np.array_equal(va1, va2) and np.array_equal(tr1, tr2)
    assert not set(tr1) & set(va1) and len(tr1) + len(va1) == len(labels)
    assert np.bincount(labels[va1]).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_val_indices(labels, 1.5, seed=0)


def test_max_train_keeps_a_deterministic_subset():
    a, b = load_embedded("digits", max_train=100), load_embedded("digits", max_train=100)
    assert len(a.train) == 100 and torch.equal(a.train.tensors[1], b.train.tensors[1])


def test_unknown_and_missing_datasets_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="embedded task 'svhn'"):
        load_embedded("svhn")
    with pytest.raises(DatasetNotFoundError, match="unknown real task"):
        load_real("NotADataset", tmp_path, None)
    with pytest.raises(DatasetNotFoundError, match=f"MNIST: not found under {tmp_path}"):
        load_real("MNIST", tmp_path, None)
    with pytest.raises(DatasetNotFoundError, match="RESISC45"):
        load_real("RESISC45", tmp_path, None)


def test_imagefolder_real_task(tmp_path):
    from PIL import Image

    for c in ("beach", "forest"):
        (tmp_path / "resisc45" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(tmp_path / "resisc45" / c / f"{i}.png")
    import torchvision.transforms as T

    s = load_real("RESISC45", tmp_path, T.ToTensor())
    assert s.classes == ["beach", "forest"]
    assert len(s.train) + len(s.val) + len(s.test) == 20
    x, y = s.test[0]
    assert x.shape == (3, 8, 8) and y in (0, 1)
