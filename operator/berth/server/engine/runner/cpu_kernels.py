"""Berth's AVX2 kernels for the gguf weight format (``cpu_kernels.c``), built at first use: its GGUF blocks' linears
and a decode step's attention.

torch has no fast CPU kernel for 4-bit weights without AVX-512 (``_weight_int4pack_mm_for_cpu`` on an AVX2-only
EPYC: 10-20x slower than fp32) and none for Q8_0. Of the libraries looked at, torchao's x86 int4 path is that same
int4pack kernel and its low-bit CPU kernels are ARM's; ggml's kernels come only inside llama.cpp. So these are
Berth's own: y = x W^T for a GGUF file's Q4_0/Q4_1 and Q8_0 blocks with the activations quantized inside the call
per block of 32 to two int8 digits (llama.cpp's dot products use one; one alone lost the small values next to an
outlier, and SmolLM2's greedy output then left fp32's at the first token on one prompt of four), output rows split
over OpenMP threads (``set_threads``; torch's count unless set: at one or a few rows torch's small ops gain nothing
from threads while the kernels do, so ``--threads auto`` may give the kernels every core and torch one, see
runner/threads.py).

The C source ships with the package; ``library()`` compiles it once per source, compiler and flags into
``$BERTH_KERNEL_DIR`` (default ``~/.cache/berth/kernels``, else the temp dir) with the C compiler of ``$CC`` or
``cc`` / ``gcc`` on PATH (about 1 s), loads it with ctypes and checks its ABI number. Where that cannot be done
(not x86-64, a CPU without AVX2/FMA/F16C, no compiler, a failed build, ``BERTH_CPU_KERNELS=0``) ``library()`` is
None and ``why_not()`` says why: the gguf format then falls back to int4pack (runner/packed.py) and logs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ABI = 7
# Output rows a tile of the kernels' weight layout (cpu_kernels.c: TILE).
TILE = 4
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
NEEDED_FLAGS = ("avx2", "fma", "f16c")
GROUP = 32
_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``), empty where unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


_threads: int | None = None


def set_threads(n: int | None) -> None:
    """The kernels' thread count: ``n``, or None to follow torch's (``torch.get_num_threads()``). The kernels and
    torch share one OpenMP runtime (torch's libgomp, loaded first), so this is the same pool of threads."""
    global _threads
    _threads = n


def num_threads() -> int:
    return _threads if _threads is not None else torch.get_num_threads()


def _cache_dir() -> Path:
    configured = os.environ.get("BERTH_KERNEL_DIR")
    if configured:
        return Path(configured)
    home = Path(os.path.expanduser("~"))
    if os.access(home, os.W_OK):
        return home / ".cache" / "berth" / "kernels"
    return Path(tempfile.gettempdir()) / f"berth-kernels-{os.getuid()}"


def _private(path: Path) -> bool:
    """Whether ``path`` is ours and no one else may write it: a library loaded from a directory another user can
    write to (a shared temp dir) would run their code in this process."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, how) or (None, why not)."""
    if os.environ.get("BERTH_CPU_KERNELS", "1") == "0":
        return None, "BERTH_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels are x86-64 AVX2 code, this machine is {platform.machine()}"
    missing = [f for f in NEEDED_FLAGS if f not in cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or $CC) to build them"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"berth-cpu-kernels-{key}.so"
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private = _private(target.parent) and (not target.exists() or _private(target))
    except OSError as e:
        return None, f"the kernel directory {target.parent} is not usable ({e})"
    if not private:
        return (
            None,
            f"{target.parent} or {target.name} can be written by another user: not loading code from it",
        )
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run(
                [cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], check=True, capture_output=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            return None, f"building them with {cc} failed ({err.decode(errors='replace').strip()[:300] or e})"
        os.replace(tmp, target)  # atomic: another process building the same key gets a whole file
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"loading {target} failed ({e})"
    lib.berth_kernels_abi.restype = _INT
    if lib.berth_kernels_abi() != ABI:
        return None, f"{target} has ABI {lib.berth_kernels_abi()}, not {ABI}"
    lib.berth_q4_linear.argtypes = [_P, _I, _I, _P, _I, _P, _INT, _P, ctypes.c_float, _P]
    lib.berth_q4_linear.restype = _INT
    lib.berth_q8_linear.argtypes = [_P, _I, _I, _P, _I, _P, _INT, _P, ctypes.c_float, _P]
    lib.berth_q8_linear.restype = _INT
    lib.berth_decode_attention.argtypes = [_P] * 8 + [_I] * 6 + [ctypes.c_float, _P, _INT]
    lib.berth_decode_attention.restype = _INT
    return lib, f"AVX2 kernels {target.name}"


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    lib, how = _build()
    if lib is None:
        logger.info("Berth's CPU kernels for GGUF blocks are not available: %s", how)
    return lib, how


def library() -> ctypes.CDLL | None:
    return _loaded()[0]


def why_not() -> str:
    """Why ``library()`` is None ('' when it is not)."""
    lib, how = _loaded()
    return "" if lib is not None else how


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("Berth's CPU kernel could not allocate its quantized activations")


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """[N, G, ...] -> uint8 [N/TILE, G, TILE * bytes of one row's block] (N padded with zeros to a multiple of
    TILE): a tile's rows side by side, block by block."""
    n = t.shape[0]
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    rows = t.reshape(t.shape[0], t.shape[1], -1).contiguous().view(torch.uint8)  # [N, G, bytes]
    return (
        rows.view(-1, TILE, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape[0] // TILE, rows.shape[1], -1)
    )


def pack_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of W = d q + m (``codes`` uint8 [N, K] in 0..15, ``d``, ``m`` [N, K/32]): per tile
    and block, the rows' 16 code bytes (file order), their float32 d, their float32 zero at code 8, m + 8 d (see
    cpu_kernels.c); 6 bits a weight."""
    n, k = codes.shape
    blocks = codes.view(n, k // GROUP, GROUP)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)
    parts = (qs, d.float().unsqueeze(-1), (m.float() + 8.0 * d.float()).unsqueeze(-1))
    return torch.cat([_tiles(p) for p in parts], dim=-1).contiguous()


def pack_q8(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of W = d q (``codes`` int8 [N, K], ``d`` [N, K/32]): per tile and block, the rows'
    32 codes, then their float32 d; 9 bits a weight."""
    n, k = codes.shape
    parts = (codes.view(n, k // GROUP, GROUP), d.float().unsqueeze(-1))
    return torch.cat([_tiles(p) for p in parts], dim=-1).contiguous()


def linear(
    fn: str,
    x: torch.Tensor,
    w: torch.Tensor,
    n: int,
    norm: tuple[torch.Tensor, float] | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """float32 [rows, n] = residual + f(x) [rows, K] W^T by the kernel ``fn`` (``berth_q4_linear`` for ``w`` =
    ``pack_q4(...)`` of W [n, K], ``berth_q8_linear`` for ``pack_q8``); f is the RMSNorm ``norm`` = (weight, eps)
    where given, else the identity; residual None: none."""
    lib = library()
    assert lib is not None
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    padded = int(w.shape[0]) * TILE
    y = torch.empty(x2.shape[0], padded, dtype=torch.float32)
    norm_w = None if norm is None else norm[0].detach().float().contiguous()
    res = None
    if residual is not None and padded == n and residual.dtype == torch.float32:
        res = residual.reshape(-1, n).contiguous()
    rc = getattr(lib, fn)(
        x2.data_ptr(),
        x2.shape[0],
        x2.shape[1],
        w.data_ptr(),
        padded,
        y.data_ptr(),
        num_threads(),
        None if norm_w is None else norm_w.data_ptr(),
        0.0 if norm is None else norm[1],
        None if res is None else res.data_ptr(),
    )
    if rc != 0:
        raise MemoryError("Berth's CPU kernel could not allocate its quantized activations")
    out = y if padded == n else y[:, :n]
    if residual is not None and res is None:
        out = out + residual.reshape(-1, n)
    return out


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    ctx: torch.Tensor,
    heads: int,
    scale: float,
) -> torch.Tensor:
    """One layer's attention of a decode step, one query a row, in one call: the rotary embedding of q and k
    (``cos``, ``sin_signed`` [B, D]: runner/fused_layers.py's ``rotate``), this step's k and v written to the paged
    cache at ``slots``, and softmax(q K^T scale) V over each row's first ``ctx`` positions through its block
    ``tables`` [B, W]. ``qkv`` float32 [B, heads + 2 kv_heads, D] (rotated in place); caches float32
    [blocks, block_size, kv_heads, D]; float32 [B, heads, D] out."""
    lib = library()
    assert lib is not None
    b, _, d = qkv.shape
    _, bs, kvh, _ = k_cache.shape
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert (
        qkv.dtype == k_cache.dtype == torch.float32 and tables.dtype == ctx.dtype == slots.dtype == torch.long
    )
    cos2 = cos.reshape(b, d).float().contiguous()
    sin2 = sin_signed.reshape(b, d).float().contiguous()
    tables, ctx, slots = tables.contiguous(), ctx.contiguous(), slots.contiguous()
    out = torch.empty(b, heads, d, dtype=torch.float32)
    rc = lib.berth_decode_attention(
        qkv.data_ptr(),
        cos2.data_ptr(),
        sin2.data_ptr(),
        slots.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        ctx.data_ptr(),
        b,
        heads,
        kvh,
        d,
        bs,
        int(tables.shape[1]),
        scale,
        out.data_ptr(),
        num_threads(),
    )
    if rc != 0:
        raise ValueError(f"Berth's decode attention kernel takes head sizes up to 512, not {d}")
    return out
