"""Builds the wheel with the files the service needs at run time beside the code.

The firmware profiles, examples, systemd units, dashboards, alert rules and .proto
sources stay at the repository's top level; build_py copies them into
gateway/_share/<name> of the build tree, where gateway.common.resources finds them once
installed. An editable install reads them in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# alerts/ is optional: it ships when the tree has it.
SHARE = ("firmware_profiles", "examples", "systemd", "dashboards", "alerts", "protos")
REQUIRED = frozenset(SHARE) - {"alerts"}


class BuildPyWithShare(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in SHARE:
            src = ROOT / name
            if not src.is_dir():
                if name in REQUIRED:
                    raise SystemExit(f"build: {src} is missing: the wheel needs it")
                continue
            dst = Path(self.build_lib) / "gateway" / "_share" / name
            # A previous build may have left files since removed from the tree.
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))


setup(cmdclass={"build_py": BuildPyWithShare})
