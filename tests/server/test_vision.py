"""Vision-language models through a real ``berth serve`` (transformers backend, tiny random weights).

For tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE), GLM-4V, GLM-4.5V (MoE), Idefics3 and SmolVLM
models built here (``tiny_vlms.py``: transformers config classes, the built-in tokenizer plus the image
tokens, the model's own image processor), the greedy answer of ``berth serve`` to chats with one and
with two ``data:`` images equals transformers ``generate`` on the same processor inputs token for
token (with a prefill chunk cutting inside an image); image and text requests sent at once answer as
alone; a repeated image hits the prefix cache (``berth_image_cached_prompt_tokens`` in /metrics), a
changed one does not; bad image input is a 400 naming ``messages[i].content[j]``, and the server goes on.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.server import tiny_vlms

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

from berth.server.engine.mm_prompt import expand_placeholders  # noqa: E402

if TYPE_CHECKING:
    from berth.server.engine.types import LoadedModel
    from berth.server.testing import ServerProcess

pytestmark = pytest.mark.slow
NEW = 12
CHUNK = 16  # --max-num-batched-tokens: prefill chunks of 16 tokens
MAX_PIXELS = 200 * 150


def png(seed: int, size: tuple[int, int] = (84, 56), fmt: str = "PNG") -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def one_image(seed: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this? "}, image_part(png(seed))]}]


def two_images() -> list[dict[str, Any]]:  # two in one message, and a conversation across messages
    return [
        {
            "role": "user",
            "content": [
                image_part(png(1)),
                {"type": "text", "text": " and "},
                image_part(png(2, (56, 70), "JPEG")),
            ],
        },
        {"role": "assistant", "content": "Two pictures."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And this one? "}, image_part(png(3, (70, 42), "WEBP"))],
        },
    ]


TEXT = [{"role": "user", "content": "Say something about ships."}]


class Reference:
    """transformers ``generate`` on the processor inputs of the same chat."""

    def __init__(self, directory: Path) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(directory)
        self.proc = AutoImageProcessor.from_pretrained(directory)
        self.model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
        self.prompt: list[int] = []  # the last prompt's ids, image tokens expanded

    def chunk_cuts_an_image(self) -> bool:
        """True when a prefill chunk boundary (every CHUNK tokens) falls inside a run of image tokens."""
        image = self.model.config.image_token_id
        return any(
            self.prompt[p - 1] == image and self.prompt[p] == image
            for p in range(CHUNK, len(self.prompt), CHUNK)
        )

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        from PIL import Image

        images = []
        tmpl = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p["type"] == "image_url":
                        raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                        images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append(p)
                content = parts
            tmpl.append({"role": m["role"], "content": content})
        text = self.tok.apply_chat_template(tmpl, add_generation_prompt=True, tokenize=False)
        if images and self.model.config.model_type in tiny_vlms.SPLIT_MODEL_TYPES:
            return self._generate(self.split_inputs(text, images))
        ids = self.tok.encode(text, add_special_tokens=False)
        inputs: dict[str, Any] = {}
        if images:
            inputs = dict(self.proc(images=images, return_tensors="pt"))
            merge = self.proc.merge_size
            counts = [int(g.prod()) // merge**2 for g in inputs["image_grid_thw"]]
            ids, _ = expand_placeholders(ids, self.model.config.image_token_id, counts)
        t = torch.tensor([ids])
        inputs.update(input_ids=t, attention_mask=torch.ones_like(t))
        if images:
            inputs["mm_token_type_ids"] = (t == self.model.config.image_token_id).int()
        return self._generate(inputs)

    def split_inputs(self, text: str, images: list[Any]) -> dict[str, Any]:
        """Idefics3 / SmolVLM: the model's processor expands each ``<image>`` in the text (crops, rows,
        the global image), then tokenizes the whole text: ``Idefics3Processor`` itself; SmolVLM's
        processor cannot be built without torchvision (its video processor), so its steps here:
        its image processor, its ``get_image_prompt_string`` in place of each ``<image>``, the tokenizer."""
        seq_len = int(self.model.model.image_seq_len)
        if self.model.config.model_type == "idefics3":
            import copy

            from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

            proc = Idefics3Processor(self.proc, copy.deepcopy(self.tok), image_seq_len=seq_len)
            inputs = dict(proc(text=[text], images=[images], return_tensors="pt"))
            inputs.pop("mm_token_type_ids", None)
            return inputs
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        inputs = dict(self.proc(images=[images], return_row_col_info=True, return_tensors="pt"))
        rows, cols = inputs.pop("rows")[0], inputs.pop("cols")[0]
        pieces = text.split("<image>")
        assert len(pieces) == len(images) + 1
        full = pieces[0]
        for k, piece in enumerate(pieces[1:]):
            full += get_image_prompt_string(
                rows[k], cols[k], seq_len, "<fake_token_around_image>", "<image>", "<global-img>"
            )
            full += piece
        t = torch.tensor([self.tok.encode(full, add_special_tokens=False)])
        inputs.update(input_ids=t, attention_mask=torch.ones_like(t))
        return inputs

    def _generate(self, inputs: dict[str, Any]) -> list[int]:
        self.prompt = [int(x) for x in inputs["input_ids"][0]]
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        return [int(x) for x in out[0, inputs["input_ids"].shape[1] :]]

    def text(self, messages: list[dict[str, Any]]) -> tuple[str, int]:
        toks = self.tokens(messages)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if toks and toks[-1] in eos_ids:
            toks = toks[:-1]
        return self.tok.decode(toks, skip_special_tokens=True), len(toks)


@pytest.fixture(scope="module", params=tiny_vlms.MODEL_TYPES)
def vlm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2: LoadedModel
) -> Iterator[tuple[ServerProcess, Reference]]:
    from berth.server.testing import ServerProcess

    where = tmp_path_factory.mktemp(request.param)
    directory = tiny_vlms.build(request.param, where / "model", smollm2.tokenizer)
    args = [
        "--model", str(directory), "--device", "cpu", "--dtype", "float32", "--served-model-name", "vlm",
        "--max-num-batched-tokens", str(CHUNK), "--max-image-pixels", str(MAX_PIXELS), "--max-images-per-request", "3",
    ]  # fmt: skip
    with ServerProcess(args, where / "logs") as server:
        yield server, Reference(directory)


def chat(server: ServerProcess, messages: list[dict[str, Any]], **kw: Any) -> Any:
    import httpx

    body = {"model": "vlm", "messages": messages, "max_tokens": NEW, "temperature": 0, **kw}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)


def answer(server: ServerProcess, messages: list[dict[str, Any]]) -> tuple[str, int]:
    r = chat(server, messages)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def metric(server: ServerProcess, name: str) -> float:
    import httpx

    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_answers_equal_generate_with_one_and_two_images(vlm: tuple[ServerProcess, Reference]) -> None:
    server, ref = vlm
    for messages in (one_image(0), two_images()):
        want, n = ref.text(messages)
        got, m = answer(server, messages)
        assert (got, m) == (want, n)
    assert ref.chunk_cuts_an_image()  # the two-image prompt's prefill is cut inside an image
    assert metric(server, "berth_images_total") >= 4
    assert metric(server, "berth_image_prompt_tokens_total") > 0


def test_concurrent_image_and_text_requests_answer_as_alone(vlm: tuple[ServerProcess, Reference]) -> None:
    server, _ = vlm
    convs = [one_image(10), TEXT, two_images(), one_image(11), TEXT]
    alone = [answer(server, c) for c in convs]
    with ThreadPoolExecutor(len(convs)) as pool:
        together = list(pool.map(lambda c: answer(server, c), convs))
    assert together == alone


def test_a_repeated_image_hits_the_prefix_cache_a_changed_one_does_not(
    vlm: tuple[ServerProcess, Reference],
) -> None:
    server, ref = vlm
    name = "berth_image_cached_prompt_tokens_total"
    first = answer(server, one_image(20))
    before = metric(server, name)
    assert answer(server, one_image(20)) == first
    hit = metric(server, name) - before
    assert hit >= 16  # at least one full block holding the image's tokens
    before = metric(server, name)
    changed = one_image(21)  # same size, same prompt, other pixels: the same tokens
    assert answer(server, changed) == ref.text(changed)
    assert metric(server, name) - before == 0


BAD: list[tuple[Callable[[], list[dict[str, Any]]], str, str]] = [
    (lambda: [{"role": "user", "content": [{"type": "text", "text": "x"}, image_part("data:image/png;base64,@@@")]}],
     "messages[0].content[1]", "base64"),
    (lambda: [{"role": "user", "content": [image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode())]}],
     "messages[0].content[0]", "cannot be decoded"),
    (lambda: [{"role": "user", "content": [image_part(png(5, (400, 300)))]}], "messages[0].content[0]", "pixels"),
    (lambda: [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]", "unknown"),
    (lambda: [{"role": "user", "content": [image_part("http://127.0.0.1/x.png")]}], "messages[0].content[0]", "not enabled"),
    (lambda: [{"role": "user", "content": [image_part("file:///etc/passwd")]}], "messages[0].content[0]", "data: URL"),
    (lambda: [{"role": "system", "content": "s"}, {"role": "user", "content": [image_part(png(i)) for i in range(4)]}],
     "messages[1].content[3]", "more than 3 images"),
]  # fmt: skip


def test_bad_image_input_is_a_400_naming_the_part(vlm: tuple[ServerProcess, Reference]) -> None:
    server, ref = vlm
    for make, param, words in BAD:
        r = chat(server, make())
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
        assert err["type"] == "invalid_request_error"
    assert metric(server, "berth_image_rejected_total") >= 4
    # the server and its engine go on
    assert answer(server, one_image(30)) == ref.text(one_image(30))
