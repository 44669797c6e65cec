"""Images in a request, as the engine sees them: opaque processor outputs plus content hashes.

Pure Python (no torch): the serving layer decodes and preprocesses the images (the model's own
processor), the model runner turns ``data`` into tensors. ``image_hashes`` are content hashes of the
images in prompt order and ``image_starts`` the prompt index of each image's first placeholder token;
the block manager mixes an image's hash into the hash of the block where its placeholders start, so a
prefix-cache hit needs the same image bytes, not only the same (identical) placeholder tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MultiModalInput:
    data: dict[str, Any]  # the processor's outputs for the prompt (pixel_values, image_grid_thw, ...)
    image_hashes: list[bytes]
    image_starts: list[int]
    image_token_id: int
    num_image_tokens: int = 0  # placeholder tokens in the prompt (all images)
    pixels: int = 0  # decoded pixels of all images (for metrics)
    extra: dict[str, Any] = field(default_factory=dict)

    def block_salts(self, block_size: int) -> dict[int, bytes]:
        """Block index -> a hash of the images whose placeholders start in that block."""
        parts: dict[int, list[bytes]] = {}
        for h, start in zip(self.image_hashes, self.image_starts, strict=True):
            parts.setdefault(start // block_size, []).append(h)
        return {b: hashlib.blake2b(b"".join(hs), digest_size=16).digest() for b, hs in parts.items()}


def image_hash(content: bytes) -> bytes:
    return hashlib.blake2b(content, digest_size=16).digest()
