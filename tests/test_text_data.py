"""The shipped text sets (issue 14's data): the decompressed files equal the upstream bytes (the sha256 values that
shared/data-text/README.md publishes, written out here), the counts its table gives, and bad names/rows refused."""
import gzip
import hashlib
import json

import numpy as np
import pytest

from pyro_tvc.data import text as text_data
from pyro_tvc.data.text import PAIR_TASKS, TEXT_DIR, TEXT_TASKS, TextTaskError, load_text_task

# from shared/data-text/README.md (train rows, test rows, classes), independent of the vendored manifest
README_COUNTS = {"sst2": (6920, 1821, 2), "ag_news": (6080, 1520, 4), "trec": (5452, 500, 6),
                 "sms_spam": (4127, 1032, 2), "subj": (8000, 2000, 2), "emotion": (10000, 2000, 6),
                 "cola": (8551, 1043, 2), "mrpc": (4076, 1725, 2), "rte": (2490, 277, 2), "cr": (3012, 753, 2),
                 "mpqa": (6514, 1628, 2)}
README_SHA256 = {"sst2/train.jsonl": "215ce9b62548e4dd73c19d20e37035e31cb98c15ea90feba90119efb74baf195",
                 "sst2/test.jsonl": "3a6ae01fe96689f657100714a25ae56e5da582900fbf8c784a649f0ccffba284",
                 "ag_news/train.jsonl": "547969d77ec00ca6b94d09664fcaf624877760c36f9c0e9859ae37a608a22c21",
                 "trec/test.jsonl": "6ba7152c58935517a3df02a06d7c7b7f957c6e9f2d35ffb31c6118c25c2e0a7c"}


def test_every_shipped_file_decompresses_to_the_upstream_bytes():
    manifest = json.loads((TEXT_DIR / "MANIFEST.json").read_text())["tasks"]
    assert sorted(manifest) == sorted(TEXT_TASKS)
    for key, sha in README_SHA256.items():
        task, name = key.split("/")
        data = gzip.decompress((TEXT_DIR / task / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == sha == manifest[task]["sha256"][name]


def test_counts_classes_and_pairs_match_the_data_card():
    for name, (n_train, n_test, n_classes) in README_COUNTS.items():
        t = load_text_task(name, seed=0)
        assert len(t.train) + len(t.val) == n_train and len(t.test) == n_test and t.num_classes == n_classes, name
        assert t.pair == (name in PAIR_TASKS)
        sample = t.test.texts[0]
        assert (isinstance(sample, tuple) and len(sample) == 2) if t.pair else isinstance(sample, str)
        # val: about 10 % of every class, disjoint from train (by position in the train file)
        assert set(np.unique(t.val.labels)) == set(range(n_classes)), name


def test_max_train_is_a_seeded_subset_and_val_does_not_move():
    a, b = load_text_task("trec", seed=3, max_train=100), load_text_task("trec", seed=3, max_train=100)
    full = load_text_task("trec", seed=3)
    assert len(a.train) == 100 and a.train.texts == b.train.texts and set(a.train.texts) <= set(full.train.texts)
    assert a.val.texts == full.val.texts


def test_unknown_task_damaged_file_and_empty_text_are_refused(tmp_path, monkeypatch):
    with pytest.raises(TextTaskError, match="unknown text task 'imdb'; shipped text tasks: sst2, ag_news"):
        load_text_task("imdb")
    fake = tmp_path / "text_embedded"
    (fake / "sst2").mkdir(parents=True)
    (fake / "sst2" / "classes.txt").write_text("negative\npositive\n")
    rows = b'{"text": "fine", "label": 1}\n{"text": "  ", "label": 0}\n'
    (fake / "sst2" / "train.jsonl.gz").write_bytes(gzip.compress(rows))
    manifest = {"tasks": {"sst2": {"sha256": {"train.jsonl": hashlib.sha256(rows).hexdigest(),
                                              "test.jsonl": "0" * 64}}}}
    (fake / "MANIFEST.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(text_data, "TEXT_DIR", fake)
    text_data.text_manifest.cache_clear()
    try:
        with pytest.raises(TextTaskError, match=r"sst2/train.jsonl, line 2: empty or missing text"):
            load_text_task("sst2")
        (fake / "sst2" / "train.jsonl.gz").write_bytes(gzip.compress(rows.replace(b"  ", b"ok")))
        with pytest.raises(TextTaskError, match="differs from the upstream sha256"):
            load_text_task("sst2")
        (fake / "sst2" / "train.jsonl.gz").write_bytes(gzip.compress(rows)[:20])  # a truncated download
        with pytest.raises(TextTaskError, match=r"sst2/train.jsonl.gz: not a readable gzip file"):
            load_text_task("sst2")
    finally:
        text_data.text_manifest.cache_clear()
