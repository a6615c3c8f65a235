"""中文版的 ``import course``：加载上一级目录里的 ``course.py``，并让内核在那里运行。

The Chinese edition runs the English edition's code cell for cell (regenerate.py
writes both from one source).  That code expects the kernel to work in
``notebooks/``: it imports ``course`` and ``math_service`` from there, runs
``math_service.py`` as a child process and reads ``bench_results.json``.
JupyterLab starts a kernel in its notebook's folder, so the first
``import course`` of a notebook in ``zh/`` finds this file, which moves the
kernel to ``notebooks/`` and then puts the real module in its place.  The
English edition's kernel is in ``notebooks/`` from the start; after this
import, both run in the same folder.
"""

import importlib.util
import os
import sys
from pathlib import Path

COURSE = Path(__file__).resolve().parent.parent
os.chdir(COURSE)
sys.path.insert(0, str(COURSE))

# `import course` returns whatever sys.modules["course"] holds once this file has run.
_spec = importlib.util.spec_from_file_location("course", COURSE / "course.py")
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules["course"] = _module
_spec.loader.exec_module(_module)
