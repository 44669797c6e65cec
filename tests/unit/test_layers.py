"""The layering rules of DESIGN.md are executable: import-linter's contracts (pyproject.toml) hold for
the tree, and each kind of rule really bites: a copy of the tree with one forbidden import fails it.
And one room, one job: no module under operator/berth/ grows past MAX_MODULE_LINES."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 500
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root / "operator")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(
        ROOT / "operator", root / "operator", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    return root


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        pytest.param(
            "server/engine/core.py", "import fastapi", "The engine knows no HTTP", id="engine-fastapi"
        ),
        pytest.param(
            "server/serving/base.py", "import torch", "Torch only in the model runner", id="serving-torch"
        ),
        pytest.param(
            "server/engine/scheduler.py",
            "from berth.server.serving import errors",
            "Server layers",
            id="engine-imports-serving",
        ),
        pytest.param(
            "controller/status.py", "import kopf", "Builders, plan and status are pure", id="status-kopf"
        ),
        pytest.param(
            "controller/diagnosis.py",
            "import kubernetes",
            "Builders, plan and status are pure",
            id="diagnosis-k8s",
        ),
        pytest.param(
            "controller/pod.py", "import fastapi", "Builders, plan and status are pure", id="pod-fastapi"
        ),
        pytest.param(
            "controller/builders.py",
            "import fastapi",
            "Builders, plan and status are pure",
            id="builders-fastapi",
        ),
        pytest.param(
            "controller/plan.py",
            "from berth.controller import kube",
            "Builders, plan and status are pure",
            id="plan-kube-client",
        ),
        pytest.param(
            "controller/conditions.py",
            "from berth.controller import status",
            "Operator layers",
            id="conditions-imports-status",
        ),
        pytest.param(
            "gateway/relay.py", "import kubernetes", "never call Kubernetes", id="gateway-relay-k8s"
        ),
        pytest.param(
            "gateway/errors.py", "from berth.gateway import relay", "Gateway layers", id="gateway-errors-up"
        ),
        pytest.param(
            "controller/builders.py",
            "from berth.controller import reconcile",
            "Operator layers",
            id="builders-imports-reconcile",
        ),
        pytest.param(
            "api/models.py", "import berth.controller.settings", "The API is the bottom layer", id="api-up"
        ),
        pytest.param(
            "api/spec.py", "import berth.controller.settings", "The API is the bottom layer", id="api-spec-up"
        ),
        pytest.param("controller/reconcile.py", "import torch", "never load torch", id="operator-torch"),
        pytest.param(
            "bench/client.py", "import berth.server.loader", "The bench client is a client", id="bench"
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree_copy: Path, module: str, line: str, contract: str
) -> None:
    path = tree_copy / "operator" / "berth" / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # injected by test_layers\n")
    try:
        result = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken) or contract in result.stdout.split("Broken contracts")[-1], (
        result.stdout
    )


def oversized_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """'path: N lines' for each module under operator/berth/ longer than `limit` lines."""
    found = []
    for path in sorted((root / "operator" / "berth").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > limit:
            found.append(f"{path.relative_to(root)}: {n} lines")
    return found


def test_no_module_is_over_the_line_limit() -> None:
    assert oversized_modules(ROOT) == [], f"split these by job (at most {MAX_MODULE_LINES} lines each)"


def test_the_line_limit_bites(tmp_path: Path) -> None:
    module = tmp_path / "operator" / "berth" / "grown.py"
    module.parent.mkdir(parents=True)
    module.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (module.parent / "small.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    assert oversized_modules(tmp_path) == [f"operator/berth/grown.py: {MAX_MODULE_LINES + 1} lines"]
