"""Prompt templates per task (CLIP-style), used for zero-shot heads and for the captions of pre-training."""
from __future__ import annotations

GENERIC = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "mnist": ('a photo of the number: "{}".', 'a handwritten digit {}.', 'a black and white photo of the number {}.'),
    "digits": ('a tiny scanned digit {}.', 'a pixelated handwritten number {}.', 'a low resolution digit {}.'),
    "fashion_mnist": ("a grayscale photo of a {}.", "a photo of a {}, a type of clothing.", "a product photo of a {}."),
    "kmnist": ('the hiragana character "{}".', 'a handwritten japanese character "{}".', 'cursive kuzushiji "{}".'),
    "cifar10": ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of the {}."),
    "gtsrb": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "eurosat5": ("a satellite photo of {}.", "a centered satellite photo of {}.", "a land use photo of {}."),
    "resisc45_12": ("satellite imagery of {}.", "aerial imagery of {}.", "an aerial photo of a {}."),
    "dtd10": ("a photo of a {} texture.", "a photo of a {} pattern.", "a close up of a {} surface."),
    "MNIST": ('a photo of the number: "{}".',),
    "SVHN": ('a photo of the number: "{}".',),
    "GTSRB": ('a zoomed in photo of a "{}" traffic sign.',),
    "EuroSAT": ("a centered satellite photo of {}.",),
    "DTD": ("a photo of a {} texture.",),
    "Cars": ("a photo of a {}, a type of car.",),
    "SUN397": ("a photo of a {}.",),
    "RESISC45": ("satellite imagery of {}.",),
}


def templates_for(task: str) -> tuple[str, ...]:
    return TEMPLATES.get(task, GENERIC)
