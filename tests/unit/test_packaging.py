"""Packaging and layering: namespaces, lazy API, no upward imports, no generic top-level names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> layer rank; an import may only go to an equal or lower rank (never upward)
LAYERS = {"splitserve": 0, "proto": 0, "kernels": 1, "kvtransfer": 1, "router": 1,
          "roles": 2, "cluster": 3}
SUBPACKAGE = {"splitserve." + k: k for k in LAYERS if k != "splitserve"}
# Public entry points of the root namespace that name upper layers on purpose: each loads them
# only when used (lazily, inside a function or module __getattr__), so importing the root
# vocabulary still loads nothing above it. Anything else in splitserve/ must not look upward.
ENTRY_SHIMS = {ROOT / "splitserve" / name for name in ("__init__.py", "batch.py", "client.py")}


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         check=True)
    return res.stdout.strip()


def test_hashing_loads_neither_torch_nor_ray() -> None:
    out = _run("import sys, splitserve.hashing, splitserve.sampling_params, splitserve.router; "
               "print(json.dumps(['torch' in sys.modules, 'ray' in sys.modules]))"
               .replace("import sys", "import sys, json"))
    assert json.loads(out) == [False, False]


def test_subpackages_import_from_outside_repo() -> None:
    out = _run("import splitserve.roles, splitserve.router, splitserve.kernels, "
               "splitserve.kvtransfer, splitserve.cluster, splitserve.proto; "
               "from splitserve import LLM, SamplingParams; print(LLM.__module__)")
    assert out == "splitserve.roles.llm"


@pytest.mark.parametrize("name", ["router", "kernels", "roles", "cluster", "kvtransfer"])
def test_no_generic_top_level_names(name: str) -> None:
    res = subprocess.run([sys.executable, "-c", f"import {name}"], cwd="/", capture_output=True,
                         text=True, check=False)
    assert res.returncode != 0 and "No module named" in res.stderr


def _layer_of(module: str) -> str | None:
    for prefix, folder in SUBPACKAGE.items():
        if module == prefix or module.startswith(prefix + "."):
            return folder
    return "splitserve" if module == "splitserve" or module.startswith("splitserve.") else None


def test_no_import_runs_upward() -> None:
    bad = []
    for folder, rank in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if path in ENTRY_SHIMS:
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    layer = _layer_of(name)
                    if layer is not None and LAYERS[layer] > rank:
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
                    if folder == "router" and name.split(".")[0] in ("torch", "ray"):
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for folder in LAYERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).as_posix().split("/")
            pkg = ".".join(["splitserve"] + (rel[1:] if rel[0] == "splitserve" else rel))
            assert f'"{pkg}"' in text, f"{pkg} missing from pyproject packages"


def test_cli_generate_json(tiny_model_dir) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "splitserve.cluster.tools.cli", "generate", "--model", str(tiny_model_dir),
         "--prompt", "Hello there", "--max-tokens", "5", "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(data) == {"text", "token_ids", "prompt_token_ids", "finish_reason"}
    assert 1 <= len(data["token_ids"]) <= 5 and data["prompt_token_ids"]


def test_cli_bad_input_is_a_clear_error(tiny_model_dir) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "splitserve.cluster.tools.cli", "generate", "--model", "/nonexistent",
         "--prompt", "hi"], capture_output=True, text=True, timeout=300, check=False,
    )
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_ruff_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    res = subprocess.run([str(ruff), "check", str(ROOT)], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:]


@pytest.mark.extended  # ~45 s from a cold cache (torch's and transformers' stubs)
def test_mypy_clean() -> None:
    """Every source folder type-checks (the package-dir mapping means ``mypy -p splitserve``
    would see only ``splitserve/``, so the folders are named)."""
    mypy = Path(sys.executable).parent / "mypy"
    folders = [str(ROOT / name) for name in LAYERS]
    res = subprocess.run([str(mypy), "--no-error-summary", *folders], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
