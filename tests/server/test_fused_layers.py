"""The fused decoder layers' ops (runner/fused_layers.py) give bitwise the results of the modules they replace;
greedy output against transformers ``generate`` is tested in test_engine.py / test_backends.py."""

from __future__ import annotations

import pytest

from berth.server.engine.types import LoadedModel

torch = pytest.importorskip("torch")


def test_rms_norm_is_the_modules_bits(smollm2: LoadedModel) -> None:
    from berth.server.engine.runner.fused_layers import rms_norm

    gen = torch.Generator().manual_seed(0)
    layer = smollm2.model.model.layers[3]
    with torch.inference_mode():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, smollm2.model.model.norm):
            for rows in (1, 8):
                x = torch.randn(rows, norm.weight.shape[0], generator=gen) * 3
                assert torch.equal(rms_norm(norm, x), norm(x))
        # Not float32: the module itself runs (its own casts).
        module = _Recording()
        x16 = torch.randn(2, 8, generator=gen).half()
        assert torch.equal(rms_norm(module, x16), x16 * 2) and module.calls == 1


class _Recording:
    variance_epsilon = 1e-5

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


def test_rotate_is_rotate_half_bitwise(smollm2: LoadedModel) -> None:
    from berth.server.engine.runner.fused_layers import rotate, signed_sin
    from berth.server.engine.runner.model_runner import _rotate_half

    rotary = smollm2.model.model.rotary_emb
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 5, 17, 300, 2047])
    x = torch.randn(len(positions), 12, 64, generator=gen)
    cos, sin = rotary(x.unsqueeze(0), positions.unsqueeze(0))
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
    expected = x * cos + _rotate_half(x) * sin
    got = rotate(x, cos, signed_sin(sin))
    assert torch.equal(got, expected)
    assert not torch.equal(got, x * cos)  # the rotation did something


def test_an_in_order_group_attends_without_gathering_q() -> None:
    from berth.server.engine.runner.attention import AttnGroup, paged_attention

    gen = torch.Generator().manual_seed(2)
    bs, kv, heads, d, b = 4, 2, 4, 8, 3
    k_cache = torch.randn(6, bs, kv, d, generator=gen)
    v_cache = torch.randn(6, bs, kv, d, generator=gen)
    q = torch.randn(b, heads, d, generator=gen)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]])
    mask = (torch.arange(2 * bs)[None, :] < torch.tensor([5, 8, 2])[:, None]).view(b, 1, 1, 2 * bs)
    tok_idx = torch.arange(b).unsqueeze(1)
    in_order = AttnGroup(tok_idx=tok_idx, block_tables=tables, mask=mask, src=None, dst=None)
    gathered = AttnGroup(
        tok_idx=tok_idx, block_tables=tables, mask=mask, src=torch.arange(b), dst=torch.arange(b)
    )
    a = paged_attention(q, k_cache, v_cache, [in_order], 0.3)
    c = paged_attention(q, k_cache, v_cache, [gathered], 0.3)
    assert a.shape == (b, heads, d) and torch.equal(a, c)
