"""Berth's AVX2 kernels for GGUF blocks (runner/cpu_kernels.{py,c}): built at first use, y = x W^T against the
dequantized weight within the stated tolerance, the fallback when they cannot be built, and their threads.

Tolerance: the activations are quantized inside the kernel to two int8 digits per block of 32 (about 15 bits of
the block's largest value), so a linear is not exact: relative error (Frobenius) <= 1e-3 against ``x @ W^T`` with
W the dequantized weight (measured below 5e-5 on random weights and activations; with one digit, llama.cpp's q8_1,
it was 0.5-1.7%, and greedy output left fp32's at the first token on one prompt of four).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def kernels() -> Iterator[object]:
    from berth.server.engine.runner import cpu_kernels

    lib = cpu_kernels.library()
    if lib is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Berth's CPU kernels must build in CI: {cpu_kernels.why_not()}")
        pytest.skip(f"Berth's CPU kernels are not available here: {cpu_kernels.why_not()}")
    yield lib
    cpu_kernels.set_threads(None)


def _rel(y: object, ref: object) -> float:
    import torch

    assert isinstance(y, torch.Tensor) and isinstance(ref, torch.Tensor)
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize(("n", "k"), [(64, 32), (30, 96), (3072, 576)])
def test_a_kernel_linear_equals_the_dequantized_linear_within_tolerance(
    kernels: object, kind: str, n: int, k: int
) -> None:
    import torch

    from berth.server.engine.runner import cpu_kernels
    from berth.server.engine.runner.packed import KernelQ4Linear, KernelQ8Linear, Q4Weight, Q8Weight

    g = torch.Generator().manual_seed(n + k)
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    if kind == "Q8_0":
        w8 = Q8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g), d)
        weight, lin = w8.dequantize(), KernelQ8Linear
        bias = None
        layer: object = KernelQ8Linear([w8], bias)
    else:
        m = -torch.rand(n, k // 32, generator=g) * 0.1 if kind == "Q4_1" else None
        w4 = Q4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), d, m)
        weight, lin = w4.dequantize(), KernelQ4Linear
        bias = torch.randn(n, generator=g)
        layer = KernelQ4Linear([w4], bias)
    assert isinstance(layer, lin)
    for threads in (1, 2):
        cpu_kernels.set_threads(threads)
        for rows in (1, 3, 8):
            x = torch.randn(2, rows, k, generator=g)  # leading dimensions are kept
            ref = x @ weight.t() + (0 if bias is None else bias)
            y = layer(x)
            assert y.shape == (2, rows, n) and y.dtype == torch.float32
            assert _rel(y, ref) <= 1e-3, (kind, n, k, rows, _rel(y, ref))


def test_the_layout_pads_rows_to_whole_tiles_and_keeps_6_and_9_bits_per_weight(kernels: object) -> None:
    import torch

    from berth.server.engine.runner import cpu_kernels

    n, k = 3072, 576
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    d = torch.rand(n, k // 32)
    packed = cpu_kernels.pack_q4(codes, d, -d)
    assert packed.dtype == torch.uint8 and packed.numel() * 8 / (n * k) == 6.0
    q8 = cpu_kernels.pack_q8(torch.zeros(n, k, dtype=torch.int8), d)
    assert q8.numel() * 8 / (n * k) == 9.0
    # 30 rows: padded with zero rows to 32 (whole tiles of 4), the padding's outputs dropped.
    small = cpu_kernels.pack_q4(codes[:30], d[:30], -d[:30])
    assert tuple(small.shape) == (8, k // 32, 4 * (16 + 4 + 4))
    # One tile's block 0: rows 0-3's 16 code bytes side by side, then their d, then their zero at code 8 (m + 8d).
    first = small[0, 0]
    assert first[:16].tolist() == (codes[0, :16] | (codes[0, 16:32] << 4)).tolist()
    assert first[16:32].tolist() == (codes[1, :16] | (codes[1, 16:32] << 4)).tolist()
    assert first[64:80].view(torch.float32).tolist() == d[:4, 0].tolist()
    assert first[80:96].view(torch.float32).tolist() == (7 * d[:4, 0]).tolist()


def test_the_build_is_cached_and_keyed_by_the_source(
    kernels: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berth.server.engine.runner import cpu_kernels

    monkeypatch.setenv("BERTH_KERNEL_DIR", str(tmp_path))
    lib, how = cpu_kernels._build()
    assert lib is not None and how.startswith("AVX2 kernels berth-cpu-kernels-")
    (built,) = tmp_path.glob("berth-cpu-kernels-*.so")
    mtime = built.stat().st_mtime_ns
    lib, _ = cpu_kernels._build()  # found, not built again
    assert lib is not None and built.stat().st_mtime_ns == mtime and len(list(tmp_path.iterdir())) == 1


def test_where_they_cannot_be_built_the_reason_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berth.server.engine.runner import cpu_kernels

    monkeypatch.setenv("BERTH_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("BERTH_CPU_KERNELS", "0")
    assert cpu_kernels._build() == (None, "BERTH_CPU_KERNELS=0")
    monkeypatch.delenv("BERTH_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"sse2", "avx"})
    assert cpu_kernels._build() == (None, "this CPU lacks avx2, fma, f16c")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither cc nor gcc
    assert cpu_kernels._build() == (None, "no C compiler (cc, gcc or $CC) to build them")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(
        0o777
    )  # a directory others may write to (a shared temp dir): nothing is built or loaded there
    monkeypatch.setenv("BERTH_KERNEL_DIR", str(shared))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/bin/false")
    lib, why = cpu_kernels._build()
    assert lib is None and why.endswith("can be written by another user: not loading code from it"), why
    monkeypatch.undo()
    monkeypatch.setenv("BERTH_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    lib, why = cpu_kernels._build()
    assert lib is None and why == f"building them with {broken} failed (cc: error: this compiler is broken)"
    assert not list(tmp_path.glob("*.so"))


def test_time_threads_gives_the_kernels_the_threads_and_torch_one(kernels: object) -> None:
    import torch

    from berth.server.engine.runner import cpu_kernels, threads

    before = torch.get_num_threads()
    seen: list[tuple[int, int]] = []
    timings = threads.time_threads(
        lambda b: seen.append((torch.get_num_threads(), cpu_kernels.num_threads())),
        (1, 2),
        (1,),
        rounds=2,
        apply=threads._kernel_threads,
    )
    assert set(timings) == {1, 2} and set(seen) == {(1, 1), (1, 2)}
    # Afterwards torch's count is back and the kernels follow it again.
    assert torch.get_num_threads() == before and cpu_kernels.num_threads() == before


@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_decode_attention_equals_the_torch_path(kernels: object, heads: int, kv_heads: int, d: int) -> None:
    """Rotary, cache write and paged attention of a decode step in one call: the same cache contents and, within
    float32 rounding, the same output as runner/fused_layers.py's torch ops and attention.paged_attention."""
    import torch

    from berth.server.engine.runner import cpu_kernels
    from berth.server.engine.runner.attention import AttnGroup, paged_attention
    from berth.server.engine.runner.fused_layers import rotate, signed_sin

    g = torch.Generator().manual_seed(heads * d)
    blocks, bs = 12, 16
    k_cache = torch.randn(blocks, bs, kv_heads, d, generator=g)
    v_cache = torch.randn(blocks, bs, kv_heads, d, generator=g)
    ctx = torch.tensor([1, 17, 40, 16])  # one position; over a block edge; three blocks; exactly one block
    tables = torch.tensor([[5, 0, 0], [2, 7, 0], [9, 1, 3], [4, 0, 0]])
    b = len(ctx)
    pos = ctx - 1
    slots = torch.stack([tables[i, int(p) // bs] * bs + int(p) % bs for i, p in enumerate(pos)])
    qkv = torch.randn(b, heads + 2 * kv_heads, d, generator=g)
    angle = pos[:, None].float() * torch.rand(d, generator=g)[None, :]
    cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)  # [B, 1, D], as the runner's
    sin_s = signed_sin(sin)

    kc, vc = k_cache.clone(), v_cache.clone()
    qk = rotate(qkv[:, : heads + kv_heads], cos, sin_s)
    kc.view(-1, kv_heads, d).index_copy_(0, slots, qk[:, heads:])
    vc.view(-1, kv_heads, d).index_copy_(0, slots, qkv[:, heads + kv_heads :])
    kpos = torch.arange(tables.shape[1] * bs)
    group = AttnGroup(
        tok_idx=torch.arange(b).unsqueeze(1),
        block_tables=tables,
        mask=(kpos[None, :] < ctx[:, None]).view(b, 1, 1, -1),
        src=None,
        dst=None,
        ctx=ctx,
    )
    ref = paged_attention(qk[:, :heads].contiguous(), kc, vc, [group], d**-0.5)

    for threads in (1, 2):
        cpu_kernels.set_threads(threads)
        kk, vk, x = k_cache.clone(), v_cache.clone(), qkv.clone()
        out = cpu_kernels.decode_attention(x, cos, sin_s, slots, kk, vk, tables, ctx, heads, d**-0.5)
        assert out.shape == (b, heads, d)
        assert torch.allclose(kk, kc, atol=1e-6) and torch.equal(vk, vc)
        assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
