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
    """Build an open_clip CLIP model; ``pretrained`` is a local checkpoint file (never a hub tag: no network).

    The file is read by :func:`pyro_tvc.checkpoints.clip_state_dict` (state dicts, wrapped training checkpoints,
    safetensors, OpenAI's TorchScript archives; never arbitrary pickles) and massaged by open_clip's own helpers
    exactly as ``open_clip.load_checkpoint`` does. big_vision ``.npz`` weights go through open_clip itself.

    Raises:
        ValueError: unknown model name; a checkpoint that is unreadable or does not fit the model (names the file,
            the first missing/unexpected/mis-shaped keys).
        FileNotFoundError: no such checkpoint file.
    """
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; e.g. {TINY_MODEL}, ViT-B-32, ViT-B-16, ViT-L-14")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file (pyro-tvc loads local weights only)")
    model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    if pretrained is not None:
        if Path(pretrained).suffix in (".npz", ".npy"):
            open_clip.load_checkpoint(model, str(pretrained))
        else:
            from pyro_tvc.checkpoints import clip_state_dict

            load_into_clip(model, clip_state_dict(pretrained), f"--pretrained {pretrained}", model_name)
    return model.to(device).eval()


def load_into_clip(model: nn.Module, state: dict[str, torch.Tensor], where: str, model_name: str) -> None:
    """``model.load_state_dict(state)`` after open_clip's conversions (3rd-party layouts, old text-tower names,
    scalar/1-d logit scale, missing logit bias, positional-embedding resizing), as ``open_clip.load_checkpoint``.

    Raises:
        ValueError: the weights do not fit ``model`` (one line: the first offending keys).
    """
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed, \
        resize_text_pos_embed

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        mine = getattr(model, key, None)
        if key in state and mine is not None and mine.ndim != state[key].ndim:
            state[key] = state[key].reshape(mine.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    try:
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
    except Exception as err:  # noqa: BLE001 - resizing fails with assorted errors on foreign layouts
        raise ValueError(f"{where}: positional embeddings do not fit {model_name}: {err}") from err
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: not a checkpoint of {model_name}: missing keys {missing[:3]}, unexpected keys "
                         f"{unexpected[:3]}, shape mismatches {shapes[:3]} (of {len(missing)}/{len(unexpected)}/"
                         f"{len(shapes)})")
    model.load_state_dict(state, strict=True)


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


def model_input_size(model_name: str) -> int:
    """Input side in pixels of an open_clip architecture (its config's ``vision_cfg.image_size``; 224 if absent)."""
    return _side(((open_clip.get_model_config(model_name) or {}).get("vision_cfg") or {}).get("image_size", 224))


def input_size(encoder: nn.Module) -> int:
    """Side of the square input the image tower expects, in pixels (open_clip's ``visual.image_size``)."""
    return _side(getattr(encoder, "image_size", 224))


def _side(size) -> int:
    """open_clip gives an image size as an int or an (H, W) pair; pyro-tvc's inputs are square."""
    return int(size[0] if isinstance(size, (tuple, list)) else size)
