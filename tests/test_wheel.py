"""The wheel carries what the service needs at run time: installed alone in an empty venv,
`edge-gateway demo` runs from an empty directory. In a checkout the same lookups find the
repository's own directories.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from gateway.common import resources
from gateway.lab import demo

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,  # type: ignore[arg-type]
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout:.0f} s", pytrace=False)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
    )
    return r


def shipped_files() -> list[str]:
    """Every file of the resource directories as the wheel must hold it."""
    out = []
    for name in resources.NAMES:
        for p in sorted((REPO / name).rglob("*")) if (REPO / name).is_dir() else []:
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                out.append(f"gateway/_share/{p.relative_to(REPO)}")
    return out


def test_a_checkout_finds_the_repository_directories() -> None:
    assert resources.profiles_dir() == REPO / "firmware_profiles"
    assert resources.examples_dir() == REPO / "examples"
    assert resources.systemd_dir() == REPO / "systemd"
    assert resources.dashboards_dir() == REPO / "dashboards"
    assert resources.protos_dir() == REPO / "protos"
    assert demo.PROFILES_DIR == REPO / "firmware_profiles"
    assert (resources.profiles_dir() / "nbiot-meter.toml").is_file()
    with pytest.raises(ValueError, match="unknown resource directory 'nope'"):
        resources.path("nope")  # type: ignore[arg-type]


@pytest.mark.integration
def test_wheel_alone_in_an_empty_venv_runs_the_demo_from_an_empty_directory(
    tmp_path: Path,
) -> None:
    # Built from a copy, so that the build's own files stay out of the working tree.
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", ".*_cache", ".hypothesis", "__pycache__"
        ),
    )
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(wheels)], 300)
    built = sorted(wheels.glob("*.whl"))
    assert [w.name for w in built] == [f"edge_ledger_gateway-{VERSION}-py3-none-any.whl"]
    names = set(zipfile.ZipFile(built[0]).namelist())
    wanted = shipped_files()
    for must in (
        "gateway/_share/firmware_profiles/nbiot-meter.toml",
        "gateway/_share/firmware_profiles/samples/nbiot-meter/manifest.toml",
        "gateway/_share/examples/gateway.toml",
        "gateway/_share/systemd/edge-gateway.service",
        "gateway/_share/dashboards/edge-gateway.json",
        "gateway/_share/protos/edgegateway/v1/ledger.proto",
        "gateway/common/resources.py",
    ):
        assert must in names, must
    missing = [f for f in wanted if f not in names]
    assert not missing, f"{len(missing)} files missing from the wheel, e.g. {missing[:5]}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], 120)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(built[0])], 600)

    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    env = {"PATH": CLEAN_PATH, "HOME": str(home), "LANG": "C.UTF-8"}
    where = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from gateway.common import resources as r; print(r.profiles_dir())",
        ],
        60,
        cwd=empty,
        env=env,
    ).stdout.strip()
    assert where.startswith(str(venv / "lib")) and where.endswith(
        "gateway/_share/firmware_profiles"
    )

    # The rotation the demo does by default is test_integration's (a longer run).
    demo = [str(venv / "bin" / "edge-gateway"), "demo", "--seconds", "5", "--no-rotate"]
    r = run(demo, 300, cwd=empty, env=env)
    out = r.stdout + r.stderr
    assert re.search(r"ledger logs\s+3 of 3 verified, 0 duplicates applied", out), out[-3000:]
    assert re.search(r"proofs verified\s+[1-9]\d* of a sample \(0 failed\)", out), out[-3000:]
    assert re.search(r"by firmware profile\s+\S+@1 [1-9]", out), out[-3000:]
    assert list(empty.iterdir()) == [], "the demo left files in its working directory"
