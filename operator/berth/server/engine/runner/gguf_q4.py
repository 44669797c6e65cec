"""The ``gguf`` weight format: a GGUF file's own 4-bit (and, with Berth's CPU kernels, Q8_0) linear weights,
served without dequantizing.

The loader marks a model it loaded from a ``.gguf`` file (``GGUF_SOURCE``, the file's path; not set when an
adapter was merged into the weights). ``attach`` reads the file's raw blocks (the ``gguf`` package's
GGUFReader), maps its tensor names to the HF modules of the native runner (``blk.N.attn_q`` ->
``model.layers.N.self_attn.q_proj``, ...; ``output``, or the tied ``token_embd``, -> ``lm_head``), undoes
llama.cpp's row permutation of ``attn_q``/``attn_k`` (the order transformers' GGUF loader restores), and checks
each weight against the dequantized one the model holds, one tensor at a time. A Q4_0 / Q4_1 weight that matches
(and a Q8_0 one where Berth's CPU kernels run, runner/cpu_kernels.py) is attached to its module as a
``packed.Q4Source`` (the reader's tensor and the row order that matched, no codes): ``packed.pack_modules`` reads
its codes again when it packs that module (in the kernels' layout, else as int4pack: ``Int4Linear``, Q4_1's
``w = d q + m`` is int4pack's ``(q - 8) scale + zero`` with scale d, zero m + 8d, group 32), so the codes of
only the linears being packed are in memory, never all of them (reading the blocks twice costs SmolLM2's 210
tensors about 0.3 s more at start-up, one thread; the check is 0.4 s). The reader's memory map stays open until
``detach``.

Every other linear (K-quants, F16, and Q8_0 without the kernels: on SmolLM2 only the LM head, the tied Q8_0
``token_embd``) keeps its dequantized weights packed as fp16 (``packed.GGUF_FALLBACKS``); ``attach`` returns the
summary the runner logs, naming the kernels or why they are not used.
A model not loaded from a GGUF file is refused with an error naming ``--weight-format``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from berth.server.engine.runner import cpu_kernels
from berth.server.engine.runner.packed import (
    GGUF_FALLBACKS,
    Q4_ATTR,
    Q4_GROUP,
    Q4Source,
    Q4Weight,
    Q8Weight,
    int4_ok,
)

logger = logging.getLogger(__name__)

# Set by the loader on a model loaded from a .gguf file whose weights are the file's (the file's path).
GGUF_SOURCE = "berth_gguf_file"

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# Bytes per block of 32: fp16 d (and fp16 m for Q4_1), then 16 bytes of nibbles (low: elements 0-15, high: 16-31).
_Q4_BLOCK = {"Q4_0": (18, False), "Q4_1": (20, True)}
# Q8_0: fp16 d, then 32 int8 codes (served by Berth's CPU kernels only).
_Q8_BLOCK = {"Q8_0": 34}
GgufWeight = Q4Weight | Q8Weight


class GGUFWeightsError(ValueError):
    """The gguf weight format cannot serve this model."""


def hf_module_name(gguf_name: str, head_is_embedding: bool) -> str | None:
    """The HF module a GGUF linear weight belongs to, None for other tensors (norms, the embedding)."""
    if gguf_name == "output.weight" or (head_is_embedding and gguf_name == "token_embd.weight"):
        return "lm_head"
    m = _BLK.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"


def read_q4(kind: str, data: np.ndarray[Any, Any]) -> Q4Weight:
    """A Q4_0/Q4_1 tensor's blocks (GGUFReader's uint8 ``data``, [N, K/32 * block bytes]) as a Q4Weight."""
    size, has_min = _Q4_BLOCK[kind]
    n = int(data.shape[0])
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(n, -1, size))
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() if has_min else None
    qs = blocks[..., 4:] if has_min else blocks[..., 2:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)
    return Q4Weight(codes=codes.contiguous(), d=d, m=m)


def read_q8(data: np.ndarray[Any, Any]) -> Q8Weight:
    """A Q8_0 tensor's blocks (GGUFReader's uint8 ``data``, [N, K/32 * 34]) as a Q8Weight."""
    n = int(data.shape[0])
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(n, -1, _Q8_BLOCK["Q8_0"]))
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    codes = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, -1)
    return Q8Weight(codes=codes.contiguous(), d=d)


def read(kind: str, data: np.ndarray[Any, Any]) -> GgufWeight:
    return read_q8(data) if kind in _Q8_BLOCK else read_q4(kind, data)


def unpermute_rows(w: GgufWeight, n_head: int) -> GgufWeight:
    """llama.cpp's rotary row order of attn_q/attn_k back to HF's (transformers' ``_reverse_permute_weights``)."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return (
            t.reshape(n_head, n // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
        )

    if isinstance(w, Q8Weight):
        return Q8Weight(codes=rows(w.codes), d=rows(w.d))
    return Q4Weight(codes=rows(w.codes), d=rows(w.d), m=None if w.m is None else rows(w.m))


def _matches(q4: GgufWeight, weight: torch.Tensor) -> bool:
    """Whether the dequantized GGUF weight is the module's (within the rounding of the model's dtype)."""
    if tuple(q4.codes.shape) != tuple(weight.shape):
        return False
    w = weight.detach().float()
    tol = float(w.abs().max()) * max(1e-5, 2 * torch.finfo(weight.dtype).eps)
    return float((q4.dequantize() - w).abs().max()) <= tol


def _row_orders(q4: GgufWeight, gguf_name: str, arch: str, heads: int, kv_heads: int) -> list[int]:
    """The row orders to try, as the ``n_head`` to undo llama.cpp's permutation with (0: the file's order):
    llama.cpp permutes the rows of attn_q/attn_k of llama-arch files."""
    n_head = heads if ".attn_q." in gguf_name else kv_heads if ".attn_k." in gguf_name else 0
    if n_head == 0 or q4.codes.shape[0] % (2 * n_head):
        return [0]
    return [n_head, 0] if arch == "llama" else [0, n_head]


def _in_order(q4: GgufWeight, n_head: int) -> GgufWeight:
    return unpermute_rows(q4, n_head) if n_head else q4


def _source(tensor: Any, kind: str, n_head: int) -> Q4Source:
    """The reader's ``tensor`` read again (its blocks, in the row order that matched) when it is packed."""

    def load() -> GgufWeight:
        return _in_order(read(kind, tensor.data), n_head)

    return Q4Source(load)


def attach(model: Any) -> str:
    """Attach where the GGUF 4-bit weight of every linear that has a kernel is read from (a ``Q4Source``) to its
    module; the summary to log. Each tensor's codes are in memory only while it is checked.

    Raises GGUFWeightsError when the model was not loaded from a GGUF file or none of its linears is 4-bit."""
    path = getattr(model, GGUF_SOURCE, None)
    if path is None:
        raise GGUFWeightsError(
            "weight format gguf (--weight-format gguf) serves the 4-bit weights of a .gguf model file as they "
            "are: this model was not loaded from a GGUF file (or an adapter was merged into its weights); use "
            "--weight-format auto, fp32, fp16, bf16 or int8"
        )
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else ""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names and bool(getattr(cfg, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    kernels = cpu_kernels.library() is not None
    kinds = (*_Q4_BLOCK, *_Q8_BLOCK) if kernels else tuple(_Q4_BLOCK)
    served: dict[str, set[str]] = defaultdict(set)
    others: dict[str, list[str]] = defaultdict(list)
    for t in reader.tensors:
        hf = hf_module_name(t.name, tied)
        if hf is None or hf not in modules:
            continue
        kind = t.tensor_type.name
        if kind not in kinds:
            others[f"{kind}, no kernel"].append(hf)
            continue
        q4 = read(kind, t.data)
        orders = _row_orders(q4, t.name, arch, heads, kv_heads)
        match = next((o for o in orders if _matches(_in_order(q4, o), modules[hf].weight)), None)
        if match is None:
            others["differs from the loaded weights"].append(hf)
        elif not kernels and isinstance(q4, Q4Weight) and not int4_ok(q4):
            others[f"{kind}, shape {tuple(q4.codes.shape)} not int4pack's"].append(hf)
        else:
            setattr(modules[hf], Q4_ATTR, _source(t, kind, match))
            served[kind].add(hf)
        del q4
    all_served = set().union(*served.values())
    for n in linears:
        if n not in all_served and not any(n in v for v in others.values()):
            others["not in the GGUF file"].append(n)
    q4_count = sum(len(served[k]) for k in _Q4_BLOCK)
    if not q4_count:
        detach(model)
        raise GGUFWeightsError(
            f"weight format gguf (--weight-format gguf): no linear weight of {path} is Q4_0 or Q4_1 "
            f"({_describe(others)}); use --weight-format auto, fp16, bf16 or int8"
        )
    q8_count = sum(len(served[k]) for k in _Q8_BLOCK)
    how = (
        f"Berth's AVX2 kernels, group {Q4_GROUP}, int8 activations"
        if kernels
        else f"int4pack, group {Q4_GROUP}, bf16 activations; Berth's CPU kernels: {cpu_kernels.why_not()}"
    )
    return (
        f"{q4_count} linear weights served from the GGUF file's 4-bit blocks"
        + (f" and {q8_count} from its Q8_0 blocks" if q8_count else "")
        + f" ({how})"
        + (f"; as {GGUF_FALLBACKS[0]}: {_describe(others)}" if others else "")
    )


def _describe(others: dict[str, list[str]]) -> str:
    parts = []
    for why, mods in others.items():
        shown = ", ".join(mods[:3]) + (f" and {len(mods) - 3} more" if len(mods) > 3 else "")
        parts.append(f"{shown} ({why})")
    return "; ".join(parts)


def detach(model: Any) -> None:
    """Drop the attached GGUF weight sources (the packed linears hold what they need; the file's memory map is
    closed with the last reference to its reader)."""
    for m in model.modules():
        if hasattr(m, Q4_ATTR):
            delattr(m, Q4_ATTR)
