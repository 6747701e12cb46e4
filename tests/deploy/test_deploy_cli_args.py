"""Every command deploy/ gives papscan parses with the real CLI, so a renamed command, flag
or value breaks the build here rather than a pod at night; and every PAPSCAN_* variable
it sets is one papscan reads."""

from __future__ import annotations

import re

import pytest

from tests.deploy.deploy_files import (
    PAPSCAN,
    PAPSCAN_PROBE,
    REPO,
    compose,
    invocations,
    k8s_docs,
    parse_papscan,
    probe_module,
    runbook_invocations,
)

ALL = list(invocations())
RUNBOOK = list(runbook_invocations())


def test_the_deploy_files_give_commands_to_check():
    executables = {inv.argv[0] for inv in ALL}
    assert executables == {PAPSCAN, PAPSCAN_PROBE}, executables
    commands = {parse_papscan(inv.argv[1:])[0] for inv in ALL if inv.argv[0] == PAPSCAN}
    assert {"worker", "serve", "watch"} <= commands
    assert len(RUNBOOK) >= 8, "the runbook's papscan commands were not found"


@pytest.mark.parametrize(
    "invocation", [i for i in ALL + RUNBOOK if i.argv[0] == PAPSCAN], ids=lambda i: i.where
)
def test_papscan_commands_parse(invocation):
    try:
        parse_papscan(invocation.argv[1:])
    except Exception as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"{invocation.where}: `{' '.join(invocation.argv)}`: {message}")


@pytest.mark.parametrize(
    "invocation", [i for i in ALL if i.argv[0] == PAPSCAN_PROBE], ids=lambda i: i.where
)
def test_probe_commands_parse(invocation):
    try:
        probe_module().parser().parse_args(list(invocation.argv[1:]))
    except SystemExit:
        pytest.fail(f"{invocation.where}: `{' '.join(invocation.argv)}` does not parse")


def test_a_renamed_flag_is_caught():
    """The check itself works: a flag papscan does not have is an error."""
    with pytest.raises(Exception, match="No such option"):
        parse_papscan(["worker", "--gpus", "0"])
    with pytest.raises(Exception, match="valid integer"):
        parse_papscan(["serve", "--port", "eighty"])


def test_the_gpu_workers_each_own_device_zero_of_their_one_gpu():
    """Compose and Kubernetes hand each worker one GPU, which it sees as device 0."""
    for inv in ALL:
        if inv.argv[:2] == (PAPSCAN, "worker") and "gpu" in inv.where:
            _, params = parse_papscan(inv.argv[1:])
            assert params["gpu"] == 0, inv


def _known_variables() -> set[str]:
    """Every PAPSCAN_* name papscan's code (and the probe) reads."""
    names: set[str] = set()
    for folder in ("worker", "engines"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(re.findall(r"PAPSCAN_[A-Z0-9_]+", path.read_text()))
    names |= set(re.findall(r"PAPSCAN_[A-Z0-9_]+", probe_module().__doc__ or ""))
    names |= set(
        re.findall(r"PAPSCAN_[A-Z0-9_]+", (REPO / "deploy/docker/papscan_probe.py").read_text())
    )
    return names


def _set_variables():
    for name, service in compose()["services"].items():
        for var in service.get("environment") or {}:
            yield f"compose {name}", var
    for path, doc in k8s_docs():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            for env in container.get("env", []):
                yield f"{path.name} {container['name']}", env["name"]


def test_every_papscan_variable_set_is_one_papscan_reads():
    known = _known_variables()
    assert {"PAPSCAN_DB_URL", "PAPSCAN_BROKER_URL", "PAPSCAN_METRICS_PORT"} <= known
    unknown = [
        (where, var)
        for where, var in _set_variables()
        if var.startswith("PAPSCAN_") and var not in known
    ]
    assert not unknown, f"papscan reads no such variable: {unknown}"
