"""Plain accuracy of an image encoder + frozen head over a split (no composition involved)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from pyro_tvc.backbones import ZeroShotHead
from pyro_tvc.data import iterate_batches


@torch.no_grad()
def encode_dataset(encoder: torch.nn.Module, dataset: Dataset, batch_size: int = 256, device="cpu"):
    """Features ``[N, D]`` and labels ``[N]`` of a whole split."""
    feats, labels = [], []
    for x, y in iterate_batches(dataset, batch_size):
        feats.append(encoder(x.to(device)).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def accuracy(encoder: torch.nn.Module, head: ZeroShotHead, dataset: Dataset, batch_size: int = 256,
             device="cpu") -> float:
    """Top-1 accuracy in percent."""
    feats, labels = encode_dataset(encoder, dataset, batch_size, device)
    return 100.0 * (head(feats.to(device)).argmax(-1).cpu() == labels).float().mean().item()
