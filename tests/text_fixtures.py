"""A tiny BERT folder (random weights, a character-level WordPiece vocabulary) standing in for a real encoder."""
from __future__ import annotations

import string
from pathlib import Path


def tiny_bert_folder(folder: Path, layers: int = 3, hidden: int = 16, seed: int = 0, kind: str = "bert") -> Path:
    """Write ``config.json``, ``model.safetensors`` and a tokenizer to ``folder`` (as ``save_pretrained`` does);
    ``kind="roberta"``: RoBERTa's layout (positions counted from the padding index); ``kind="electra"``: ELECTRA's,
    with embeddings narrower than the layers (projected up); the same tokenizer."""
    import torch
    from transformers import (BertConfig, BertModel, BertTokenizerFast, ElectraConfig, ElectraModel, RobertaConfig,
                              RobertaModel)

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + [f"##{c}" for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    shape = dict(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                 intermediate_size=2 * hidden, max_position_embeddings=128, type_vocab_size=2, pad_token_id=0)
    if kind == "electra":
        ElectraModel(ElectraConfig(embedding_size=hidden // 2, **shape)).save_pretrained(folder)
    elif kind == "roberta":
        RobertaModel(RobertaConfig(**shape), add_pooling_layer=False).save_pretrained(folder)
    else:
        BertModel(BertConfig(**shape), add_pooling_layer=False).save_pretrained(folder)
    BertTokenizerFast(vocab={v: i for i, v in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    return folder
