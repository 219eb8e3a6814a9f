"""Plain accuracy of an image encoder + frozen head over a split (no composition involved), and theta_0's features
of a split, cached on disk."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

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


def encode_cached(encoder: torch.nn.Module, images, theta0_sha256: str | None,
                  cache_dir: Path | None, device="cpu") -> torch.Tensor:
    """theta_0's features ``[N, D]`` of ``images [N, 3, S, S]`` (a tensor or a streamed
    :class:`~pyro_tvc.data.streaming.LazyImages`), read from / written to ``cache_dir``.

    The key is a hash of theta_0's image tower (``theta0_sha256``) and of the data: the preprocessed pixels of a
    tensor; for streamed files their paths, sizes and modification times with the input side and the preprocessing's
    name (:meth:`~pyro_tvc.data.streaming.ImageFiles.fingerprint`). Another model, another image or another resize
    is a miss, never a stale hit. A cache that cannot be written is skipped silently (a read-only artefacts folder);
    without ``theta0_sha256`` or ``cache_dir`` nothing is cached.
    """
    import hashlib

    from pyro_tvc.runtime import OutputError, atomic_output

    from pyro_tvc.data.streaming import LazyImages

    streamed = isinstance(images, LazyImages)

    @torch.no_grad()
    def encode() -> torch.Tensor:
        if streamed:
            return torch.cat([encoder(x.to(device)).cpu() for x in images.batches()] or [torch.empty(0)])
        return encode_dataset(encoder, TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                              device=device)[0]

    identity = images.fingerprint() if streamed else ""
    if cache_dir is None or theta0_sha256 is None or identity is None:
        return encode()
    digest = hashlib.sha256(theta0_sha256.encode())
    digest.update(str(tuple(images.shape)).encode())
    if streamed:
        digest.update(identity.encode())
    else:
        digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))  # no copy of the pixels
    path = Path(cache_dir) / f"{digest.hexdigest()[:32]}.pt"
    if path.is_file():
        try:
            feats = torch.load(path, weights_only=True)
            if isinstance(feats, torch.Tensor) and feats.shape[0] == len(images):
                return feats
        except Exception:  # noqa: BLE001 - any unreadable cache file is recomputed and replaced
            pass
    feats = encode()
    try:
        with atomic_output(path) as tmp:
            torch.save(feats, tmp)
    except (OSError, OutputError):
        pass
    return feats


def encode_target(encoder: torch.nn.Module, splits: dict, theta0_sha256: str | None, cache_dir: Path | None,
                  device="cpu") -> dict:
    """``{split: (images, features, labels)}`` on ``device`` for ``splits = {split: (images, labels)}``
    (:attr:`pyro_tvc.data.targets.TargetData.splits`), the features through :func:`encode_cached`."""
    return {name: (images.to(device), encode_cached(encoder, images, theta0_sha256, cache_dir, device).to(device),
                   labels.to(device)) for name, (images, labels) in splits.items()}


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true label (nats); probabilities floored at 1e-12."""
    return -probs.gather(-1, labels[:, None]).clamp_min(1e-12).log().mean().item()
