"""Expanding a templated prompt's image placeholders (pure Python).

Processors of M-RoPE models replace each image's placeholder token by ``t * h * w / merge**2``
copies (the image's merged patches); Berth does the same with the image processor's grids, so only
the image processor (PIL backend, no torchvision) is needed.
"""

from __future__ import annotations


def expand_placeholders(
    ids: list[int], image_token_id: int, counts: list[int]
) -> tuple[list[int], list[int]]:
    """(ids with the k-th image token repeated counts[k] times, the start of each image's run)."""
    return splice_placeholders(ids, image_token_id, [[image_token_id] * n for n in counts])


def splice_placeholders(
    ids: list[int], image_token_id: int, prompts: list[list[int]]
) -> tuple[list[int], list[int]]:
    """(ids with the k-th image token replaced by prompts[k], the start of each image's prompt).

    For processors that expand an image into text (Idefics3, SmolVLM: crop tags, row/column tokens and
    the image tokens), already tokenized.
    """
    out: list[int] = []
    starts: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            if k >= len(prompts):
                raise ValueError("the prompt has more image placeholders than images")
            starts.append(len(out))
            out.extend(prompts[k])
            k += 1
        else:
            out.append(t)
    if k != len(prompts):
        raise ValueError(f"the prompt has {k} image placeholders for {len(prompts)} images")
    return out, starts
