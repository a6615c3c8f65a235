"""Real NestJS for the dev layer: a pinned NestJS 12 project, installed with npm on first use.

The interop tests, the benchmark and the course run NestJS itself from the
project in ``nest/`` (``package.json`` and its committed lock).  Its
``node_modules`` are installed once, by ``npm ci``: in place when the
package folder is writable (a checkout), else in a cache folder keyed by the
lock file, so that a non-editable install works as well.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent / "nest"
MIN_NODE = 20
INSTALL_TIMEOUT = 600.0  # seconds: npm ci on a slow network
_FILES = ("package.json", "package-lock.json")


class NestUnavailable(RuntimeError):
    """NestJS cannot run here; the message says why in one line, and what to do."""


def node() -> str:
    """The ``node`` to run, version 20 or newer."""
    path = shutil.which("node")
    if path is None:
        raise NestUnavailable(f"node is not installed: NestJS needs Node.js {MIN_NODE} or newer")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    major = version.stdout.strip().lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < MIN_NODE:
        found = version.stdout.strip()
        raise NestUnavailable(f"{path} is Node.js {found}; NestJS needs {MIN_NODE} or newer")
    return path


def _installed(folder: Path) -> bool:
    return (folder / "node_modules" / "@nestjs" / "microservices" / "package.json").is_file()


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
    node()  # a clear error first when Node itself is missing or too old
    npm = shutil.which("npm")
    if npm is None:
        raise NestUnavailable("npm is not installed: it comes with Node.js")
    if folder != PROJECT:
        shutil.copytree(PROJECT, folder, dirs_exist_ok=True)
    print(f"installing NestJS 12 into {folder} (npm ci, once)...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NestUnavailable(f"npm ci did not finish within {INSTALL_TIMEOUT:g} s") from None
    if done.returncode != 0 or not _installed(folder):
        said = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        why = " / ".join(said) or f"exit code {done.returncode}"
        raise NestUnavailable(f"npm ci failed in {folder} (is the npm registry reachable?): {why}")
    return folder
