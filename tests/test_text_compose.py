"""The composition engine on BERT's parameter layout (word/position/type embeddings, q/k/v/o, LayerNorms, FFN)
against independent references: Hugging Face's own forward, and per-sample weights merged by hand."""
import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformers")

from pyro_tvc.compose.engine import Composer  # noqa: E402
from pyro_tvc.text.encoder import (SentenceEncoder, load_text_model, prefix_states, resolve_model_folder,  # noqa: E402
                                   tokenize)
from tests.test_compose import explicit_per_sample, random_bank  # noqa: E402
from tests.text_fixtures import tiny_bert_folder  # noqa: E402

TEXTS = ["a short one", "the movie was great fun, really!", "x", ("is this a pair", "yes it is")]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return load_text_model(resolve_model_folder(tiny_bert_folder(tmp_path_factory.mktemp("bert") / "model")))


@pytest.mark.parametrize("kind", ["roberta", "electra"])
def test_roberta_and_electra_layouts_equal_hugging_face_and_compose(tmp_path, kind):
    model, tokenizer = load_text_model(resolve_model_folder(tiny_bert_folder(tmp_path / kind, kind=kind)))
    assert type(model).__name__ == {"roberta": "RobertaModel", "electra": "ElectraModel"}[kind]
    x = _tokens(tokenizer)
    hidden = model(input_ids=x[:, 0], token_type_ids=x[:, 1], attention_mask=x[:, 2]).last_hidden_state
    w = x[:, 2].unsqueeze(-1).float()
    module = SentenceEncoder(model, 0)
    torch.testing.assert_close(module(x), (hidden * w).sum(1) / w.sum(1), rtol=1e-5, atol=1e-6)
    bank = random_bank(module, 2, scale=0.05)
    lam = 0.5 * torch.randn(x.shape[0], 2, bank.num_blocks)
    torch.testing.assert_close(Composer(module, bank, "fast")(x, lam), explicit_per_sample(module, bank, x, lam),
                               rtol=1e-4, atol=1e-5)


def _tokens(tokenizer):
    return torch.cat([tokenize(tokenizer, TEXTS[:3], 48), tokenize(tokenizer, TEXTS[3:], 48)])


def test_sentence_encoder_equals_hugging_face_mean_pooling(tiny_bert):
    model, tokenizer = tiny_bert
    x = _tokens(tokenizer)
    assert int(x[:, 2].sum(1).max()) < 48  # the batch is trimmed: padding must not matter
    hidden = model(input_ids=x[:, 0], token_type_ids=x[:, 1], attention_mask=x[:, 2]).last_hidden_state
    w = x[:, 2].unsqueeze(-1).float()
    expected = (hidden * w).sum(1) / w.sum(1)
    torch.testing.assert_close(SentenceEncoder(model, 0)(x), expected, rtol=1e-5, atol=1e-6)
    for start in (1, 2):  # the frozen bottom once, then the tail: the same features
        tail = SentenceEncoder(model, start)
        torch.testing.assert_close(tail(prefix_states(model, x, start)), expected, rtol=1e-5, atol=1e-6)
        assert all(n.startswith(f"layers.{start}.") or int(n.split(".")[1]) > start
                   for n, _ in tail.named_parameters())


def test_pair_tasks_encode_both_sentences_jointly(tiny_bert):
    _, tokenizer = tiny_bert
    x = tokenize(tokenizer, [("ab", "cd")], 16)
    ids = tokenizer.convert_ids_to_tokens(x[0, 0, :int(x[0, 2].sum())].tolist())
    assert ids == ["[CLS]", "a", "##b", "[SEP]", "c", "##d", "[SEP]"]
    assert x[0, 1, :7].tolist() == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("start", [0, 1])
def test_composed_bert_methods_agree_with_hand_merged_weights(tiny_bert, start):
    model, tokenizer = tiny_bert
    module = SentenceEncoder(model, start)
    names = [n for n, _ in module.named_parameters()]
    if start == 0:
        assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight"} <= set(names)
    assert any(n.endswith("attention.self.query.weight") for n in names)
    assert any(n.endswith("attention.output.dense.weight") for n in names)
    assert any(n.endswith("intermediate.dense.weight") for n in names)
    bank = random_bank(module, 3, scale=0.05)
    x = prefix_states(model, _tokens(tokenizer), start)
    lam = (0.5 * torch.randn(x.shape[0], 3, bank.num_blocks)).requires_grad_()
    ref = explicit_per_sample(module, bank, x, lam)
    ref_grad, = torch.autograd.grad(ref.square().sum(), lam)
    for method in ("naive", "reference", "fast"):
        out = Composer(module, bank, method=method)(x, lam)
        grad, = torch.autograd.grad(out.square().sum(), lam)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=method)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4, msg=method)


def test_embedding_tables_low_rank_and_gradcheck(tiny_bert):
    model, tokenizer = tiny_bert
    module = SentenceEncoder(model, 0).double()
    bank = random_bank(module, 2, scale=0.05)
    x = _tokens(tokenizer)[:2]
    lam = (0.5 * torch.randn(2, 2, bank.num_blocks, dtype=torch.float64)).requires_grad_()
    full = Composer(module, bank, "fast")(x, lam)
    # rank >= every matrix's smaller side: the low-rank path (rows of U for the tables) equals full rank
    torch.testing.assert_close(Composer(module, bank, "fast", rank=512)(x, lam), full, rtol=1e-8, atol=1e-10)
    lowrank = Composer(module, bank, "fast", rank=2)
    assert torch.autograd.gradcheck(lambda lam: lowrank(x, lam), (lam,))
    word = "embeddings.word_embeddings.weight"
    merged = dict(module.named_parameters())
    merged[word] = merged[word] + lam[0, 1, bank.block_names.index(word)].detach() * bank.stacked[word][1]
    only_word = torch.zeros(1, 2, bank.num_blocks, dtype=torch.float64)
    only_word[0, 1, bank.block_names.index(word)] = lam[0, 1, bank.block_names.index(word)].detach()
    torch.testing.assert_close(Composer(module, bank, "fast")(x[:1], only_word),
                               functional_call(module, merged, (x[:1],)), rtol=1e-8, atol=1e-10)
