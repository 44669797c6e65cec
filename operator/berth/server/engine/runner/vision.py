"""Image-text-to-text models on the transformers backend (Qwen2-VL/2.5-VL/3-VL, GLM-4.xV, Idefics3/SmolVLM).

A sequence with images gets, on its first scheduled chunk, its image embeddings (the model's vision
tower, once per request: ``get_image_features`` over the processor's ``pixel_values``) and its
multimodal rotary positions (the model's own ``get_rope_index``: ``[3, prompt_len]`` and the delta that
decode positions continue with), kept on the sequence (``Sequence.mm_state``; recomputation after a
preemption reuses them). Every step then runs the language model on ``inputs_embeds``: the token
embeddings of all scheduled tokens with the rows of image placeholders replaced by the slice of the
image embeddings they stand for, so a chunk may start or end inside an image; positions are
``[3, 1, T]``: text-only sequences (and decodes) use their position on all three axes (plus their
delta). Image and text requests share a step.

Qwen3-VL's deepstack: the vision tower also gives intermediate features per image token for the first
few decoder layers; forward hooks on those layers add, after each, its features to the hidden states
of the step's image-token rows (the model's own ``_deepstack_process``, which runs only when the
language model gets ``visual_pos_masks``, which Berth never passes), so a chunk that cuts through an
image adds the slice of its tokens, as for the input embeddings.

Idefics3 and SmolVLM have no M-RoPE: their image tokens are placeholders for the connector's output
(``get_image_features`` over all crops of the prompt's images, ``pixel_attention_mask`` marking the
padding), merged the same way, with the plain 1-D positions.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from berth.server.engine.runner import attention
from berth.server.engine.runner.hf import TransformersRunner
from berth.server.engine.scheduler import ScheduledSeq
from berth.server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
# image tokens are placeholders for the connector's output, positions are the plain 1-D ones
PLAIN_MODEL_TYPES = ("idefics3", "smolvlm")


def is_vision_model(model: Any) -> bool:
    """True for a transformers image-text-to-text model with the interface this runner uses."""
    inner = getattr(model, "model", None)
    kind = getattr(model.config, "model_type", None)
    if inner is None or not hasattr(inner, "get_image_features"):
        return False
    if kind in PLAIN_MODEL_TYPES:
        return True
    return kind in MROPE_MODEL_TYPES and hasattr(inner, "get_rope_index")


@dataclass
class _State:
    embeds: torch.Tensor  # [num image tokens, hidden] in prompt order
    positions: torch.Tensor | None  # [3, prompt_len] (M-RoPE models; None: the 1-D positions)
    delta: int  # decode position p (>= prompt_len) has rotary position p + delta
    before: list[int]  # before[p]: image tokens in the prompt before position p (len prompt_len + 1)
    deepstack: list[torch.Tensor]  # Qwen3-VL: per early decoder layer, [num image tokens, hidden]


class VisionRunner(TransformersRunner):
    """The transformers backend for image-text-to-text models."""

    supports_images = True

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.inner = model.model
        self.embed = model.get_input_embeddings()
        self.image_features = 0  # images through the vision tower (tests, metrics)
        self.mrope = model.config.model_type in MROPE_MODEL_TYPES
        rope = getattr(self.inner, "get_rope_index", None)
        self._rope_params = set(inspect.signature(rope).parameters) if self.mrope and rope else set()
        # Qwen3-VL's deepstack: the vision tower's intermediate features are added to the hidden states
        # of the image tokens after each of the first len(deepstack_visual_indexes) decoder layers
        vision = getattr(model.config, "vision_config", None)
        self.deepstack_layers = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        self._deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # this step's (rows, embeds)
        layers = model.get_decoder().layers
        self._deepstack_hooks = [
            layers[i].register_forward_hook(self._deepstack_hook(i)) for i in range(self.deepstack_layers)
        ]

    def _deepstack_hook(self, layer: int) -> Any:
        def hook(_: Any, args: tuple[Any, ...], output: Any) -> Any:
            if self._deepstack is None:
                return output
            rows, embeds = self._deepstack
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, hidden]
            # the model's own _deepstack_process: hidden[visual rows] + the layer's visual embeddings
            hidden = hidden.index_add(1, rows, embeds[layer][None].to(hidden.dtype))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _features(self, data: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image embeddings of a prompt, in order: [image tokens, hidden]; and the deepstack ones."""
        pixel = data["pixel_values"].to(self.dtype)
        if self.mrope:
            out = self.inner.get_image_features(pixel_values=pixel, image_grid_thw=data["image_grid_thw"])
        else:  # Idefics3 / SmolVLM: [1, crops, 3, H, W]; all-zero padding crops are dropped by the model
            mask = data.get("pixel_attention_mask")
            out = self.inner.get_image_features(pixel_values=pixel, pixel_attention_mask=mask)
        feats = getattr(out, "pooler_output", out)
        embeds = torch.cat(list(feats), dim=0) if isinstance(feats, list | tuple) else feats
        deepstack = [
            (torch.cat(list(f), dim=0) if isinstance(f, list | tuple) else f).to(self.dtype)
            for f in (getattr(out, "deepstack_features", None) or [])[: self.deepstack_layers]
        ]
        if len(deepstack) != self.deepstack_layers:
            raise ValueError(f"the vision tower gave {len(deepstack)} deepstack features")
        return embeds.reshape(-1, embeds.shape[-1]), deepstack

    def _state(self, seq: Sequence) -> _State:
        st: _State | None = seq.mm_state
        if st is not None:
            return st
        mm = seq.multimodal
        data = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in mm.data.items()}
        embeds, deepstack = self._features(data)
        self.image_features += len(mm.image_hashes)
        positions: torch.Tensor | None = None
        delta = 0
        if self.mrope:
            ids = torch.tensor([seq.prompt_token_ids], dtype=torch.long, device=self.device)
            kwargs: dict[str, Any] = {"image_grid_thw": data["image_grid_thw"]}
            if "mm_token_type_ids" in self._rope_params:
                kwargs["mm_token_type_ids"] = data.get("mm_token_type_ids", (ids == mm.image_token_id).int())
            if "attention_mask" in self._rope_params:
                kwargs["attention_mask"] = torch.ones_like(ids)
            pos, d = self.inner.get_rope_index(ids, **kwargs)
            positions, delta = pos[:, 0, :], int(d.flatten()[0])
        flags = [1 if t == mm.image_token_id else 0 for t in seq.prompt_token_ids]
        before = [0]
        for f in flags:
            before.append(before[-1] + f)
        if before[-1] != embeds.shape[0]:
            raise ValueError(
                f"the prompt holds {before[-1]} image tokens but the images give {embeds.shape[0]} embeddings"
            )
        st = _State(embeds.to(self.dtype), positions, delta, before, deepstack)
        seq.mm_state = st
        return st

    @torch.inference_mode()
    def execute(self, batch: Seq[ScheduledSeq]) -> torch.Tensor:
        inp = attention.prepare(batch, self.block_size, self.device)
        embeds = self.embed(inp.input_ids)  # [T, hidden]
        pos3 = inp.positions[None].expand(3, -1).clone() if self.mrope else None
        ds_rows: list[torch.Tensor] = []
        ds_embeds: list[list[torch.Tensor]] = [[] for _ in range(self.deepstack_layers)]
        flat = 0
        for s in batch:
            seq, n = s.seq, s.num_tokens
            if seq.multimodal is not None:
                st = self._state(seq)
                plen = seq.num_prompt_tokens
                end = min(s.start + n, plen)
                if s.start < plen:
                    if pos3 is not None and st.positions is not None:
                        pos3[:, flat : flat + end - s.start] = st.positions[:, s.start : end]
                    a, b = st.before[s.start], st.before[end]
                    if b > a:
                        rows = torch.tensor(
                            [
                                flat + p - s.start
                                for p in range(s.start, end)
                                if st.before[p + 1] > st.before[p]
                            ],
                            dtype=torch.long,
                            device=self.device,
                        )
                        embeds = embeds.index_copy(0, rows, st.embeds[a:b].to(embeds.dtype))
                        if self.deepstack_layers:
                            ds_rows.append(rows)
                            for layer, feats in enumerate(st.deepstack):
                                ds_embeds[layer].append(feats[a:b])
                if pos3 is not None and s.start + n > plen:
                    lo = max(s.start, plen)
                    pos3[:, flat + lo - s.start : flat + n] += st.delta
            flat += n
        positions = pos3[:, None, :] if pos3 is not None else inp.positions[None]
        if ds_rows:
            self._deepstack = (torch.cat(ds_rows), [torch.cat(e) for e in ds_embeds])
        try:
            return self._forward(inp, inputs_embeds=embeds[None], position_ids=positions)
        finally:
            self._deepstack = None
