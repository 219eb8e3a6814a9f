"""Backbones: open_clip models by name (local weights only) and zero-shot classification heads.

The embedded default ``pyro-tvc-tiny`` is an open_clip model config shipped in ``pyro_tvc/model_configs`` and
registered with ``open_clip.add_model_config``, so it is built by open_clip's own classes exactly like ViT-B-32:
every code path (composition, task vectors, heads) is shared between the tiny model and the real ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pyro_tvc.data.prompts import templates_for

TINY_MODEL = "pyro-tvc-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)


def create_clip(model_name: str = TINY_MODEL, pretrained: str | Path | None = None, device: str = "cpu") -> nn.Module:
    """Build an open_clip CLIP model; ``pretrained`` is a local checkpoint file (never a hub tag: no network)."""
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; e.g. {TINY_MODEL}, ViT-B-32, ViT-B-16, ViT-L-14")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file (pyro-tvc loads local weights only)")
    model = open_clip.create_model(model_name, pretrained=str(pretrained) if pretrained else None, device=device,
                                   weights_only=True)
    return model.eval()


def tokenizer_for(model_name: str):
    return open_clip.get_tokenizer(model_name)


@dataclass
class ZeroShotHead:
    """A frozen linear head: ``logits = scale * normalize(features) @ weight.T``.

    ``weight [C, D]`` holds unit-norm class embeddings averaged over prompt templates (CLIP's zero-shot recipe).
    """

    weight: torch.Tensor
    logit_scale: float

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """features ``[N, D]`` -> logits ``[N, C]``."""
        return self.logit_scale * F.normalize(features, dim=-1) @ self.weight.T

    def to(self, device) -> "ZeroShotHead":
        return ZeroShotHead(self.weight.to(device), self.logit_scale)


@torch.no_grad()
def zero_shot_head(model: nn.Module, tokenizer, classes: list[str], task: str,
                   templates: tuple[str, ...] | None = None) -> ZeroShotHead:
    """Class embeddings from the text tower: mean over templates of normalised text features, renormalised."""
    templates = templates or templates_for(task)
    device = next(model.parameters()).device
    weights = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return ZeroShotHead(torch.stack(weights), float(model.logit_scale.exp().clamp(max=100.0)))


def image_encoder(model: nn.Module) -> nn.Module:
    """The image tower whose parameters are the blocks of every task vector (open_clip: ``model.visual``)."""
    return model.visual
