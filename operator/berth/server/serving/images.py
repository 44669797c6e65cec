"""Images in chat requests: ``image_url`` content parts -> decoded images -> the engine's multimodal input.

- ``data:`` URLs (base64 PNG, JPEG, WebP, GIF's first frame) always; ``http(s)`` URLs only with
  ``--allow-image-urls`` and a host on the ``--image-url-domain`` allow-list (its subdomains too), with
  the byte and time limits, without following redirects to another host, and never to a loopback,
  private, link-local or otherwise non-public address unless that host is itself on the list by name.
  The host is resolved once, every address checked, and the connection made to a checked address
  (with the original Host header and TLS server name), so a DNS-rebinding name cannot answer a public
  address to the check and an internal one to the connection.
- Limits: ``--max-images-per-request``, ``--max-image-bytes``, ``--max-image-pixels`` (checked on the
  header before the pixels are decoded).
- Decoding and preprocessing run in a worker thread (``asyncio.to_thread``), off the event loop.
- Each problem is a 400 naming ``messages[i].content[j]``.

The model's own image processor resizes and patches the images; the templated prompt's single image
placeholder per image is expanded to the image's merged patch count (``mm_prompt.expand_placeholders``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from berth.server.engine.mm_prompt import expand_placeholders, splice_placeholders
from berth.server.engine.multimodal import MultiModalInput, image_hash
from berth.server.serving.errors import bad_param
from berth.server.settings import ServerSettings

logger = logging.getLogger(__name__)

_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


@dataclass
class ImageRef:
    param: str  # messages[i].content[j]
    url: str


@dataclass
class DecodedImage:
    param: str
    image: Any  # PIL.Image.Image, RGB
    digest: bytes


def url_of(param: str, image_url: Any) -> str:
    """The URL of an ``image_url`` part (``{"url": ...}``, or a bare string as some clients send)."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise bad_param(param, 'an image_url part needs "image_url": {"url": "data:image/png;base64,..."}')
    return url


def _data_url_bytes(ref: ImageRef, limit: int) -> bytes:
    header, sep, payload = ref.url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise bad_param(
            ref.param, "a data: image URL must look like data:image/<png|jpeg|webp>;base64,<data>"
        )
    if len(payload) * 3 // 4 > limit:
        raise bad_param(ref.param, f"the image is larger than {limit} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_param(ref.param, f"the image's base64 data does not decode: {e}") from e


def _host_allowed(host: str, domains: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d.lower() or host.endswith("." + d.lower().lstrip(".")) for d in domains)


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (one lookup), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(address: str) -> bool:
    addr = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is not part of the address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return bool(addr.is_global)


def _checked_address(ref: ImageRef, host: str, port: int, domains: tuple[str, ...]) -> str:
    """The address to connect to for ``host``: resolved once, here, and every address it resolves to
    checked (public, unless the host is on the allow-list by its exact name); the connection then goes
    to this address, never through a second lookup a DNS-rebinding name could answer differently."""
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise bad_param(ref.param, f"the image URL's host {host!r} does not resolve") from e
    if not addresses:
        raise bad_param(ref.param, f"the image URL's host {host!r} does not resolve")
    listed = host.lower().rstrip(".") in {d.lower().rstrip(".") for d in domains}
    if not listed and not all(_is_public(a) for a in addresses):
        raise bad_param(ref.param, f"{host!r} is not a public address")
    return addresses[0]


def _pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(``url`` with its host replaced by ``address``, the Host header, the TLS server name)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    pinned = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    return pinned, {"Host": host_header}, {"sni_hostname": host}


def _default_port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _fetch(ref: ImageRef, settings: ServerSettings, transport: Any = None) -> bytes:
    """GET an allowed image URL: to the address checked by ``_checked_address`` (with the URL's Host
    header and TLS server name, so virtual hosts and certificates work), no proxy from the environment
    (a proxy would look the name up itself), redirects only to the same host (and the same address)."""
    import httpx

    url = ref.url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not settings.allow_image_urls:
        raise bad_param(ref.param, "image URLs are not enabled on this server: send the image as a data: URL")
    if not _host_allowed(host, settings.image_url_domains):
        raise bad_param(ref.param, f"image URLs from {host!r} are not allowed on this server")
    address = _checked_address(ref, host, _default_port(parts), settings.image_url_domains)
    limit = settings.max_image_bytes
    try:
        with httpx.Client(
            timeout=settings.image_fetch_timeout, follow_redirects=False, trust_env=False, transport=transport
        ) as client:
            for _ in range(4):
                target, headers, extensions = _pinned(url, address)
                with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                    if resp.is_redirect:
                        nxt = urllib.parse.urljoin(url, resp.headers.get("location", ""))
                        if urllib.parse.urlsplit(nxt).hostname != host:
                            raise bad_param(ref.param, "the image URL redirects to another host")
                        url = nxt
                        continue
                    if resp.status_code != 200:
                        raise bad_param(ref.param, f"fetching the image answered HTTP {resp.status_code}")
                    body = bytearray()
                    for chunk in resp.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise bad_param(ref.param, f"the image is larger than {limit} bytes")
                    return bytes(body)
    except httpx.HTTPError as e:
        raise bad_param(ref.param, f"fetching the image failed: {type(e).__name__}") from e
    raise bad_param(ref.param, "the image URL redirects too often")


def decode_one(ref: ImageRef, settings: ServerSettings) -> DecodedImage:
    """Bytes -> an RGB PIL image (blocking: call it in a thread); 400 naming the part for any problem."""
    from PIL import Image, UnidentifiedImageError

    if ref.url.startswith("data:"):
        raw = _data_url_bytes(ref, settings.max_image_bytes)
    elif ref.url.startswith(("http://", "https://")):
        raw = _fetch(ref, settings)
    else:
        raise bad_param(
            ref.param, "an image URL must be a data: URL (or http(s), where the server allows it)"
        )
    if len(raw) > settings.max_image_bytes:
        raise bad_param(ref.param, f"the image is larger than {settings.max_image_bytes} bytes")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in _FORMATS:
                raise bad_param(ref.param, f"image format {img.format} is not accepted (PNG, JPEG, WebP)")
            w, h = img.size
            if w * h > settings.max_image_pixels:
                raise bad_param(
                    ref.param, f"the image has {w}x{h} pixels, more than {settings.max_image_pixels}"
                )
            rgb = img.convert("RGB")
            rgb.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise bad_param(ref.param, f"the image cannot be decoded: {type(e).__name__}") from e
    return DecodedImage(ref.param, rgb, image_hash(raw))


def _split_image_prompts(
    processor: Any, data: dict[str, Any], encode: Callable[[str], list[int]], image_token_id: int
) -> list[list[int]]:
    """Idefics3 / SmolVLM: per image, the token ids of its prompt string (crops, rows, global image).

    The string is the one the model's own processor puts in place of ``<image>``
    (``get_image_prompt_string``: ``<fake_token_around_image><row_1_col_1><image>*n ... <global-img>``);
    it starts and ends with special tokens, so tokenizing it alone gives the ids it has in the prompt.
    """
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    seq_len = int(getattr(processor, "image_seq_len", 0) or 0)
    if seq_len <= 0:
        raise ValueError("the image processor does not say how many tokens an image crop takes")
    rows = [r for sample in data["rows"] for r in sample]
    cols = [c for sample in data["cols"] for c in sample]
    out: list[list[int]] = []
    for r, c in zip(rows, cols, strict=True):
        text = get_image_prompt_string(  # type: ignore[no-untyped-call]
            int(r),
            int(c),
            seq_len,
            fake_token_around_image=getattr(processor, "fake_image_token", "<fake_token_around_image>"),
            image_token=getattr(processor, "image_token", "<image>"),
            global_image_token=getattr(processor, "global_image_token", "<global-img>"),
        )
        ids = encode(text)
        if ids.count(image_token_id) != seq_len * (int(r) * int(c) + 1):
            raise ValueError("the tokenizer does not encode the image prompt's tokens as special tokens")
        out.append(ids)
    return out


def _prepare(
    refs: list[ImageRef],
    settings: ServerSettings,
    processor: Any,
    ids: list[int],
    image_token_id: int,
    encode: Callable[[str], list[int]] | None = None,
) -> tuple[list[int], MultiModalInput]:
    images = [decode_one(r, settings) for r in refs]
    split = getattr(processor, "do_image_splitting", None) is not None  # Idefics3 / SmolVLM
    try:
        if split:  # one sample holding all the images, as the model's processor batches them
            data = dict(
                processor(images=[[d.image for d in images]], return_row_col_info=True, return_tensors="pt")
            )
        else:
            data = dict(processor(images=[d.image for d in images], return_tensors="pt"))
    except Exception as e:  # the processor refusing an image (too small, odd aspect ratio)
        raise bad_param(images[0].param, f"the model's image processor rejected the images: {e}") from e
    try:
        if split:
            if encode is None:
                raise ValueError("no tokenizer to encode the image prompts")
            prompts = _split_image_prompts(processor, data, encode, image_token_id)
            data.pop("rows")
            data.pop("cols")
            expanded, starts = splice_placeholders(ids, image_token_id, prompts)
            counts = [p.count(image_token_id) for p in prompts]
        else:
            merge = int(getattr(processor, "merge_size", 1) or 1)
            counts = [int(g.prod()) // merge**2 for g in data["image_grid_thw"]]
            expanded, starts = expand_placeholders(ids, image_token_id, counts)
    except ValueError as e:
        raise bad_param(
            "messages", f"the chat template's image placeholders do not match the images: {e}"
        ) from e
    mm = MultiModalInput(
        data=data,
        image_hashes=[d.digest for d in images],
        image_starts=starts,
        image_token_id=image_token_id,
        num_image_tokens=sum(counts),
        pixels=sum(d.image.size[0] * d.image.size[1] for d in images),
    )
    return expanded, mm


async def prepare(
    refs: list[ImageRef],
    settings: ServerSettings,
    processor: Any,
    ids: list[int],
    image_token_id: int,
    encode: Callable[[str], list[int]] | None = None,
) -> tuple[list[int], MultiModalInput]:
    """Decode and preprocess the images in a worker thread; (expanded prompt ids, multimodal input).

    ``encode`` tokenizes (no special tokens added) the image prompt strings of models whose processor
    expands an image into text (Idefics3, SmolVLM).
    """
    return await asyncio.to_thread(_prepare, refs, settings, processor, ids, image_token_id, encode)
