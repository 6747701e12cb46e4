"""What the deploy tests read: deploy/'s files, the papscan commands they give, and the
real `papscan` CLI to parse those commands with (without running them)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "papscan-night.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
YAMLLINT_CONFIG = DEPLOY / ".yamllint.yaml"
PROBE = DEPLOY / "docker" / "papscan_probe.py"

# The executables the images put on PATH: `papscan` (their ENTRYPOINT) and the probe.
PAPSCAN = "papscan"
PAPSCAN_PROBE = "papscan-probe"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in `path`."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def k8s_manifests() -> list[Path]:
    """The Kubernetes manifests (everything in deploy/k8s but the Kustomization)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in k8s_manifests() for doc in load_yaml_docs(path)]


def k8s_doc(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return load_yaml_docs(COMPOSE)[0]


@cache
def probe_module():
    """deploy/docker/papscan_probe.py, imported from its path."""
    spec = importlib.util.spec_from_file_location("papscan_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the commands deploy/ gives ------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One command line a deploy file runs: `argv[0]` is the executable."""

    where: str
    argv: tuple[str, ...]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str]:
    import json

    return json.loads(value)


def image_entrypoint(path: Path) -> list[str]:
    """The final stage's ENTRYPOINT of a Dockerfile (exec form)."""
    entry = [rest for ins, rest in dockerfile_instructions(path) if ins == "ENTRYPOINT"]
    return _exec_form(entry[-1])


def _compose_image_entrypoints() -> dict[str, list[str]]:
    """Image name -> ENTRYPOINT, for the images compose builds from deploy/docker."""
    out = {}
    for service in compose()["services"].values():
        build = service.get("build")
        if build:
            out[service["image"]] = image_entrypoint(
                DEPLOY / build["context"] / build["dockerfile"]
            )
    return out


def invocations() -> Iterator[Invocation]:
    """Every command line that compose, the Kubernetes manifests and the Dockerfiles run:
    containers' commands (after the image's ENTRYPOINT), health checks and probes."""
    for path in DOCKERFILES:
        entry = image_entrypoint(path)
        for ins, rest in dockerfile_instructions(path):
            if ins == "CMD":
                yield Invocation(f"{path.name} CMD", (*entry, *_exec_form(rest)))
            elif ins == "HEALTHCHECK":
                _, _, form = rest.partition("CMD ")
                yield Invocation(f"{path.name} HEALTHCHECK", tuple(_exec_form(form)))

    entrypoints = _compose_image_entrypoints()
    for name, service in compose()["services"].items():
        if "command" in service and service["image"] in entrypoints:
            command = service["command"]
            argv = shlex.split(command) if isinstance(command, str) else command
            yield Invocation(f"compose {name}", (*entrypoints[service["image"]], *argv))
        test = (service.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD" and service["image"] in entrypoints:
            yield Invocation(f"compose {name} healthcheck", tuple(test[1:]))

    for path, doc in k8s_docs():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            where = f"{path.name} {doc['metadata']['name']}/{container['name']}"
            assert "command" in container, f"{where}: give the command, not the image's default"
            yield Invocation(where, (*container["command"], *container.get("args", [])))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command:
                    yield Invocation(f"{where} {probe}", tuple(command))


def _papscan_at(words: list[str]) -> int | None:
    """Where papscan's own argv starts in a shell line: its first word, after `--`
    (kubectl exec), or after `docker compose exec|run [flags] SERVICE`."""
    for i, word in enumerate(words):
        if word != PAPSCAN:
            continue
        if i == 0 or words[i - 1] == "--":
            return i
        if words[:2] == ["docker", "compose"] and len(words) > 2 and words[2] in ("exec", "run"):
            return i
    return None


def runbook_invocations() -> Iterator[Invocation]:
    """The papscan commands deploy/README.md gives: in its shell blocks (also behind
    `docker compose exec|run … SERVICE` or `kubectl … --`) and in inline code."""
    text = (DEPLOY / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        lines += re.sub(r"\\\n", " ", block).splitlines()
    lines += re.findall(r"`(papscan [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for line in lines:
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        start = _papscan_at(words)
        if start is None:
            continue
        argv = []
        for word in words[start:]:
            if word in ("&&", "||", "|", ";", "&"):
                break
            argv.append(word)
        yield Invocation(f"deploy/README.md: {line}", tuple(argv))


# --- the real CLI ----------------------------------------------------------------------------


@cache
def papscan_command():
    import typer

    from worker.cli.main import app

    return typer.main.get_command(app)


def parse_papscan(argv: list[str] | tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """Parse `papscan ARGV…` with papscan's own (Typer/Click) command, as the shell would
    hand it over, without running anything: (the leaf command's name, its parameters).

    Raises:
        Exception: Click's usage error (an unknown command or option, a bad value, a
            missing argument) or a command group given without a subcommand.
    """
    command = papscan_command()
    ctx = command.make_context(PAPSCAN, list(argv))
    while hasattr(ctx.command, "resolve_command"):  # a group: descend into its subcommand
        rest = [*(ctx.__dict__.get("_protected_args") or []), *ctx.args]
        if not rest:
            raise ValueError(f"`papscan {' '.join(argv)}` names a group, not a command")
        name, sub, rest = ctx.command.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
    return ctx.command.name, ctx.params


# --- external tools ----------------------------------------------------------------------------


def tool(name: str, how: str) -> str:
    """The path of executable `name` (next to this Python first: pip installs tools into
    the virtual environment), or skip saying how to get it."""
    import sys

    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"`{name}` is not installed ({how})")
    return found


def run_tool(argv: list[str], cwd: Path = REPO, env: dict[str, str] | None = None):
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, check=False
    )
