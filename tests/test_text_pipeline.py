"""The text path end to end on a tiny BERT folder and small subsets of two shipped text sets: prepare --modality
text, then the benchmark, against independent recomputations (Hugging Face's own forward with hand-merged
weights; GLUE's metrics by hand); and its bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pyro_tvc.artifacts import ArtifactPaths, load_head  # noqa: E402
from pyro_tvc.cli import main  # noqa: E402
from pyro_tvc.data.text import load_text_task  # noqa: E402
from pyro_tvc.task_vectors import TaskVector  # noqa: E402
from pyro_tvc.text.encoder import load_text_model, tokenize  # noqa: E402
from pyro_tvc.text.metrics import f1_positive, matthews_corrcoef  # noqa: E402
from pyro_tvc.text.prepare import MAX_TEST, MAX_VAL  # noqa: E402
from tests.text_fixtures import tiny_bert_folder  # noqa: E402

TASKS = ["trec", "mrpc"]
PREP = ["--max-train", "160", "--finetune-steps", "40", "--finetune-lr", "3e-3", "--max-length", "32",
        "--text-layers", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def text_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    model = tiny_bert_folder(root / "bert")
    out = root / "artifacts"
    assert main(["prepare", "--modality", "text", "--model", str(model), "--tasks", *TASKS, "--out", str(out),
                 *PREP]) == 0
    return model, out


def _hf_accuracy(model_dir, vector, head, texts, labels, max_length):
    """Independent reference: Hugging Face's BertModel with the vector added to its own parameter names (layer
    numbering as in the encoder), mean pooling over the mask, then the head."""
    model, tokenizer = load_text_model(model_dir)
    state = model.state_dict()
    for name, delta in (vector.params.items() if vector is not None else []):
        hf = name.replace("layers.", "encoder.layer.", 1)
        state[hf] = state[hf] + delta
    model.load_state_dict(state)
    x = tokenize(tokenizer, texts, max_length)
    with torch.no_grad():
        h = model(input_ids=x[:, 0], token_type_ids=x[:, 1], attention_mask=x[:, 2]).last_hidden_state
    w = x[:, 2].unsqueeze(-1).float()
    pred = head((h * w).sum(1) / w.sum(1)).argmax(-1).numpy()
    return 100.0 * float((pred == labels).mean()), pred


def test_prepare_text_vectors_heads_and_table_against_hugging_face(text_prepared):
    model_dir, out = text_prepared
    paths = ArtifactPaths(out)
    table = json.loads(paths.table_json.read_text())
    assert [r["task"] for r in table["rows"]] == TASKS and table["modality"] == "text"
    info = json.loads((out / "text_encoder.json").read_text())
    assert info["start_layer"] == 2  # 3 layers, the top one fine-tuned
    for row in table["rows"]:
        task = row["task"]
        vector = TaskVector.load(paths.task_vector(task))
        assert {n.split(".")[1] for n in vector.params} == {"2"}  # only the fine-tuned top layer's blocks
        assert any(v.abs().max() > 0 for v in vector.params.values())
        head, classes = load_head(paths.head(task))
        data = load_text_task(task, seed=0, max_train=160, max_val=MAX_VAL, max_test=MAX_TEST)
        assert classes == data.classes
        probe, _ = _hf_accuracy(model_dir, None, head, data.test.texts, data.test.labels, 32)
        tuned, pred = _hf_accuracy(model_dir, vector, head, data.test.texts, data.test.labels, 32)
        assert row["zero_shot"] == pytest.approx(probe, abs=0.11)
        assert row["fine_tuned"] == pytest.approx(tuned, abs=0.11)
        if task == "mrpc":
            assert row["metric"] == "f1"
            assert row["fine_tuned_metric"] == pytest.approx(100 * f1_positive(pred, data.test.labels), abs=0.01)
    # the fine-tuned top layer learns: above its frozen head on the training texts' task (trec, 6 classes)
    trec = table["rows"][0]
    assert trec["fine_tuned"] > trec["zero_shot"]


def test_text_and_image_artefacts_never_share_a_folder(text_prepared, prepared, capsys):
    model_dir, out = text_prepared
    assert main(["prepare", "--modality", "text", "--model", str(model_dir), "--tasks", "trec", "--out",
                 str(prepared), *PREP]) == 2
    assert "holds image artefacts" in capsys.readouterr().err
    assert not (prepared / "text_encoder.json").exists()
    assert main(["prepare", "--out", str(out), "--tasks", "mnist", "--quiet"]) == 2
    assert "holds text artefacts" in capsys.readouterr().err


def test_options_given_explicitly_win_over_the_text_defaults():
    from pyro_tvc.prepare import PrepareConfig

    text = PrepareConfig(modality="text")
    assert (text.batch_size, text.finetune_lr, text.finetune_steps, text.max_train) == (32, 1e-4, 200, 2000)
    given = PrepareConfig(modality="text", batch_size=128, finetune_lr=1e-3, finetune_steps=300)
    assert (given.batch_size, given.finetune_lr, given.finetune_steps) == (128, 1e-3, 300)
    image = PrepareConfig()
    assert (image.batch_size, image.finetune_steps, image.max_train, image.model) == (128, 300, None, "pyro-tvc-tiny")


def test_rebuild_replaces_what_the_old_encoder_made(text_prepared, tmp_path, monkeypatch, capsys):
    model_dir, _ = text_prepared
    out = tmp_path / "art"
    monkeypatch.chdir(model_dir.parent)  # a relative --model is recorded as an absolute folder
    assert main(["prepare", "--modality", "text", "--model", model_dir.name, "--tasks", "trec", "--out", str(out),
                 *PREP]) == 0
    assert Path(json.loads((out / "text_encoder.json").read_text())["model"]).is_absolute()
    other = [a if a != "32" else "24" for a in PREP]  # another sequence length: another theta_0
    assert main(["prepare", "--modality", "text", "--model", str(model_dir), "--tasks", "sms_spam", "--out",
                 str(out), *other]) == 2
    assert "another encoder setting" in capsys.readouterr().err
    assert main(["prepare", "--modality", "text", "--model", str(model_dir), "--tasks", "sms_spam", "--out",
                 str(out), "--rebuild", *other]) == 0
    assert sorted(p.stem for p in (out / "task_vectors").glob("*.safetensors")) == ["sms_spam"]
    assert [r["task"] for r in json.loads((out / "table.json").read_text())["rows"]] == ["sms_spam"]


def test_prepare_text_rerun_is_cached(text_prepared):
    model_dir, out = text_prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main(["prepare", "--modality", "text", "--model", str(model_dir), "--tasks", *TASKS, "--out", str(out),
                 *PREP]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


def test_benchmark_on_text_with_paper_metrics(text_prepared, tmp_path):
    _, out = text_prepared
    run = tmp_path / "bench"
    assert main(["benchmark", "--artifacts", str(out), "--out", str(run), "--protocols", "target",
                 "--methods", "zero_shot", "finetuned", "task_arithmetic", "vtvc_gated", "--seeds", "1",
                 "--epochs", "1", "--max-train", "64", "--eval-samples", "2", "--quiet", "--device", "cpu"]) == 0
    records = json.loads((run / "results.json").read_text())["records"]
    table = json.loads((out / "table.json").read_text())

    def value(method, task, metric):
        (v,) = [r["value"] for r in records if (r["method"], r["task"], r["metric"], r["prediction"]) ==
                (method, task, metric, "single")]
        return v

    for row in table["rows"]:  # the benchmark scores prepare's own test inputs with the same heads
        assert value("zero_shot", row["task"], "accuracy") == pytest.approx(row["zero_shot"], abs=0.11)
        assert value("finetuned", row["task"], "accuracy") == pytest.approx(row["fine_tuned"], abs=0.11)
    assert value("finetuned", "mrpc", "f1") == pytest.approx(table["rows"][1]["fine_tuned_metric"], abs=0.01)
    md = (run / "table.md").read_text()
    assert "mrpc (F1)" in md and "MCC for CoLA" in md and "VTVC gated" in md


def _own_task(folder, texts, labels, classes, split_at):
    folder.mkdir(parents=True)
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, rows in (("train.jsonl", range(split_at)), ("test.jsonl", range(split_at, len(texts)))):
        (folder / name).write_text("".join(json.dumps({"text": texts[i], "label": int(labels[i])}) + "\n"
                                           for i in rows))
    return folder


def test_your_own_text_task_by_folder_through_prepare_and_benchmark(text_prepared, tmp_path, capsys):
    model_dir, _ = text_prepared
    trec = load_text_task("trec", max_train=240)
    mine = _own_task(tmp_path / "my_questions", trec.train.texts, trec.train.labels, trec.classes, 180)
    out = tmp_path / "artifacts"
    assert main(["prepare", "--modality", "text", "--model", str(model_dir), "--tasks", "mrpc", str(mine),
                 "--out", str(out), *PREP]) == 0
    rows = {r["task"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    assert set(rows) == {"mrpc", "my_questions"} and rows["my_questions"]["classes"] == 6
    assert rows["my_questions"]["test"] == 60  # the folder's own test.jsonl, not trec's
    run = tmp_path / "bench"
    assert main(["benchmark", "--artifacts", str(out), "--out", str(run), "--protocols", "target", "--targets",
                 str(mine), "--methods", "zero_shot", "task_arithmetic", "--seeds", "1", "--quiet",
                 "--device", "cpu"]) == 0
    records = json.loads((run / "results.json").read_text())["records"]
    (zs,) = [r["value"] for r in records if (r["method"], r["metric"]) == ("zero_shot", "accuracy")]
    assert zs == pytest.approx(rows["my_questions"]["zero_shot"], abs=0.11)
    # the folder changed after prepare (one class more): its labels no longer index the head's rows
    (mine / "classes.txt").write_text("\n".join(trec.classes + ["extra"]) + "\n")
    again = tmp_path / "bench2"
    assert main(["benchmark", "--artifacts", str(out), "--out", str(again), "--protocols", "target", "--targets",
                 str(mine), "--methods", "zero_shot", "--seeds", "1", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(7: " in err[0] and "prepared for (6: " in err[0], err
    assert "re-run `pyro-tvc prepare --modality text" in err[0] and not again.exists()
    # the same folder as a task of addition's pool (never registered as a target) is refused too
    code = main(["benchmark", "--artifacts", str(out), "--out", str(tmp_path / "bench3"), "--protocols", "addition",
                 "--methods", "zero_shot", "--seeds", "1", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "prepared for (6: " in err[0], err


def test_glue_metrics_against_hand_counts():
    pred = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    gold = np.array([1, 0, 0, 1, 1, 0, 0, 1])
    tp, tn, fp, fn = 3, 2, 2, 1
    assert matthews_corrcoef(pred, gold) == pytest.approx((tp * tn - fp * fn) / np.sqrt(5 * 4 * 4 * 3))
    assert f1_positive(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert matthews_corrcoef(np.ones(4), gold[:4]) == 0.0  # a constant predictor: no correlation
    assert matthews_corrcoef(gold, gold) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - gold, gold) == pytest.approx(-1.0)


def test_text_bad_inputs_exit_2_with_one_line(text_prepared, tmp_path, capsys):
    model_dir, _ = text_prepared
    cases = []
    cases.append((["--tasks", "imdb"], "unknown text task"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (model_dir / f).exists():
            (no_weights / f).write_bytes((model_dir / f).read_bytes())
    cases.append((["--model", str(no_weights), "--tasks", "trec"], "missing weights"))
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((model_dir / f).read_bytes())
    cases.append((["--model", str(no_tok), "--tasks", "trec"], "missing tokenizer files"))
    cases.append((["--model", str(tmp_path / "missing"), "--tasks", "trec"], "not a folder"))
    empty = _own_task(tmp_path / "empty_field", ["fine", "  ", "ok", "yes"], [0, 1, 0, 1], ["a", "b"], 3)
    cases.append((["--model", str(model_dir), "--tasks", str(empty)], "train.jsonl, line 2: empty or missing text"))
    cases.append((["--model", str(model_dir), "--tasks", str(tmp_path / "nowhere/")], "no such folder"))
    cases.append((["--model", str(model_dir), "--tasks", "trec", "--finetune-steps", "0"], "--finetune-steps 0"))
    cases.append((["--model", str(model_dir), "--tasks", "trec", "--batch-size", "0"], "--batch-size 0"))
    cases.append((["--model", str(model_dir), "--tasks", "trec", "--finetune-lr", "50"], "--finetune-lr 50.0"))
    cases.append((["--model", str(model_dir), "--tasks", "trec", "--max-length", "129"], "the encoder has 128 positions"))
    for args, words in cases:
        out = tmp_path / f"out{len(words)}"
        code = main(["prepare", "--modality", "text", "--out", str(out), "--quiet", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, args
        assert len(err) == 1 and words in err[0], err
        assert not out.exists() or not any(out.rglob("*.safetensors"))
