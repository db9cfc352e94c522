"""The Debian package: its control fields, files, modes, users, directories and maintainer
scripts are what an edge server needs, nothing in it names the build's staging directory,
and its /opt/edge-gateway runs the demo from a read-only /opt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import marshal
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PREFIX = "/opt/edge-gateway"
SITE = "opt/edge-gateway/lib/python3.11/site-packages"
UNITS = sorted(p.name for p in (REPO / "systemd").glob("*.service"))
SHARED = ("firmware_profiles", "examples", "systemd", "dashboards", "alerts", "protos")
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,  # type: ignore[arg-type]
        )
    except FileNotFoundError:
        pytest.fail(f"{cmd[0]} not found: apt-get install -y dpkg systemd", pytrace=False)


def ok(cmd: list[str], timeout: float = 120, **kw: object) -> str:
    r = run(cmd, timeout, **kw)
    assert r.returncode == 0, f"{shlex.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def extracted(deb_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    ok(["dpkg-deb", "-x", str(deb_package), str(root)])
    return root


@pytest.fixture(scope="module")
def control(deb_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("deb-control") / "DEBIAN"
    ok(["dpkg-deb", "-e", str(deb_package), str(d)])
    return d


def control_fields(deb: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in ok(["dpkg-deb", "-f", str(deb)]).splitlines():
        if line.startswith((" ", "\t")):
            fields[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def relations(value: str) -> set[str]:
    return {part.strip().split(" ")[0] for part in value.split(",") if part.strip()}


def listing(deb: Path) -> dict[str, tuple[str, str, str]]:
    """dpkg-deb -c as {path: (mode string, owner/group, link target)}."""
    entries = {}
    for line in ok(["dpkg-deb", "-c", str(deb)]).splitlines():
        perms, owner, _size, _date, _time, rest = line.split(None, 5)
        name, _, target = rest.partition(" -> ")
        entries[name.removeprefix(".").rstrip("/") or "/"] = (perms, owner, target)
    return entries


def test_control_names_package_version_architecture_and_dependencies(deb_package: Path) -> None:
    arch = ok(["dpkg", "--print-architecture"]).strip()
    assert deb_package.name == f"edge-gateway_{VERSION}_{arch}.deb"
    info = ok(["dpkg-deb", "-I", str(deb_package)])
    for script in ("control", "postinst", "prerm", "postrm"):
        assert re.search(rf"\s{script}\s", info), f"{script} missing from dpkg-deb -I:\n{info}"
    f = control_fields(deb_package)
    assert f["Package"] == "edge-gateway"
    assert f["Version"] == VERSION
    assert f["Architecture"] == arch
    assert re.fullmatch(r"[^<>]+ <[^@\s<>]+@[^@\s<>]+\.[a-z]+>", f["Maintainer"]), f["Maintainer"]
    assert relations(f["Depends"]) == {"python3.11", "systemd"}
    assert relations(f["Recommends"]) == {"softhsm2"}
    assert relations(f["Suggests"]) == {"opensc", "mosquitto", "prometheus"}
    assert "disabled" in f["Description"]
    installed_kib = int(f["Installed-Size"])
    assert 20_000 < installed_kib < 400_000, installed_kib


def test_installed_size_matches_the_files(deb_package: Path, extracted: Path) -> None:
    du = int(ok(["du", "-sk", str(extracted)]).split()[0])
    declared = int(control_fields(deb_package)["Installed-Size"])
    assert abs(du - declared) <= du * 0.05, (du, declared)


def test_files_modes_and_owners(deb_package: Path, extracted: Path) -> None:
    entries = listing(deb_package)
    assert {owner for _, owner, _ in entries.values()} == {"root/root"}
    for name, (perms, _, _) in entries.items():
        if perms[0] != "l":
            assert perms[5] != "w" and perms[8] != "w", f"{name} is writable by others: {perms}"
            assert "s" not in perms and "S" not in perms, f"{name} has a set-id bit: {perms}"
    assert entries["/usr/bin/edge-gateway"][2] == f"{PREFIX}/bin/edge-gateway"
    assert entries["/usr/share/edge-gateway"][2] == f"/{SITE}/gateway/_share"
    assert entries[f"{PREFIX}/bin/python3.11"][2] == "/usr/bin/python3.11"
    assert entries[f"{PREFIX}/bin/edge-gateway"][0] == "-rwxr-xr-x"
    for unit in UNITS:
        assert entries[f"/lib/systemd/system/{unit}"][0] == "-rw-r--r--", unit
        shipped = extracted / "lib/systemd/system" / unit
        assert shipped.read_bytes() == (REPO / "systemd" / unit).read_bytes()
        assert f"ExecStart={PREFIX}/bin/edge-gateway " in shipped.read_text()
    assert entries["/usr/lib/sysusers.d/edge-gateway.conf"][0] == "-rw-r--r--"
    assert entries["/usr/lib/tmpfiles.d/edge-gateway.conf"][0] == "-rw-r--r--"
    # pip was a build tool: the tree under /opt belongs to dpkg.
    assert not [n for n in entries if re.fullmatch(rf"{PREFIX}/bin/pip[0-9.]*", n)]
    # Nothing under /etc: the package ships no conffiles and leaves configuration alone.
    assert not [n for n in entries if n.startswith("/etc/")]


def test_wheel_data_files_are_in_the_package(deb_package: Path) -> None:
    entries = listing(deb_package)
    wanted = []
    for name in SHARED:
        if (REPO / name).is_dir():
            for p in (REPO / name).rglob("*"):
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                    wanted.append(f"/{SITE}/gateway/_share/{p.relative_to(REPO)}")
    assert len(wanted) > 100
    missing = [w for w in wanted if w not in entries]
    assert not missing, missing[:10]


def test_sysusers_and_tmpfiles_make_the_users_and_directories(
    extracted: Path, tmp_path: Path
) -> None:
    # The real tools on an empty root, called as postinst calls them.
    root = tmp_path / "root"
    for d in ("usr/lib/sysusers.d", "usr/lib/tmpfiles.d", "etc"):
        (root / d).mkdir(parents=True)
    for d in ("sysusers.d", "tmpfiles.d"):
        shutil.copy(extracted / "usr/lib" / d / "edge-gateway.conf", root / "usr/lib" / d)
    ok(["systemd-sysusers", f"--root={root}", "edge-gateway.conf"])
    ok(["systemd-tmpfiles", f"--root={root}", "--create", "edge-gateway.conf"])

    users = {}
    for line in (root / "etc/passwd").read_text().splitlines():
        name, _, uid, gid, _gecos, home, shell = line.split(":")
        users[name] = (int(uid), int(gid), home, shell)
    groups = {}
    for line in (root / "etc/group").read_text().splitlines():
        name, _, gid, members = line.split(":")
        groups[name] = (int(gid), set(filter(None, members.split(","))))
    assert set(users) == {"edge-gateway", "edge-ledger"}
    for name in ("edge-gateway", "edge-ledger"):
        uid, gid, home, shell = users[name]
        assert uid < 1000, f"{name} is not a system user: uid {uid}"
        assert groups[name][0] == gid
        assert home == f"/var/lib/{name}"
        assert shell == "/usr/sbin/nologin"
    assert "edge-gateway" in groups["softhsm"][1]

    gw, lg = users["edge-gateway"], users["edge-ledger"]
    expected = {
        "etc/edge-gateway": (0o750, 0, gw[1]),
        "etc/edge-gateway/tls": (0o750, 0, gw[1]),
        "etc/edge-gateway/keys": (0o750, 0, gw[1]),
        "etc/edge-gateway/profiles": (0o750, 0, gw[1]),
        "var/lib/edge-gateway": (0o700, gw[0], gw[1]),
        "etc/edge-ledger": (0o750, 0, lg[1]),
        "etc/edge-ledger/tls": (0o750, 0, lg[1]),
        "etc/edge-ledger/gateways": (0o750, 0, lg[1]),
        "var/lib/edge-ledger": (0o700, lg[0], lg[1]),
    }
    for rel, (mode, uid, gid) in expected.items():
        st = (root / rel).stat()
        assert stat.S_ISDIR(st.st_mode), rel
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel


def code(script: str) -> str:
    """A shell script without its comment lines."""
    return "\n".join(ln for ln in script.splitlines() if not ln.lstrip().startswith("#"))


def systemctl_verbs(script: str) -> list[str]:
    verbs = []
    for m in re.finditer(r"\bsystemctl\b([^\n;|&]*)", code(script)):
        words = [w for w in m.group(1).split() if not w.startswith("-")]
        verbs.append(words[0] if words else "")
    return verbs


def test_maintainer_scripts_never_enable_or_start_and_keep_data(control: Path) -> None:
    scripts = {s: (control / s).read_text() for s in ("postinst", "prerm", "postrm")}
    for name, text in scripts.items():
        assert stat.S_IMODE((control / name).stat().st_mode) == 0o755, name
        assert text.startswith("#!/bin/sh\n") and "\nset -e\n" in text, name
        r = run(["sh", "-n", str(control / name)])
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert "@UNITS@" not in text, name
    post = scripts["postinst"]
    assert "systemd-sysusers edge-gateway.conf" in post
    assert "systemd-tmpfiles --create edge-gateway.conf" in post
    assert "[ -d /run/systemd/system ]" in post
    assert "daemon-reload" in systemctl_verbs(post)
    assert not {"enable", "start", "restart", "reenable", "preset"} & set(systemctl_verbs(post))
    assert "deb-systemd-helper" not in post and "invoke-rc.d" not in post
    assert "not enabled" in code(post)
    prerm = scripts["prerm"]
    assert systemctl_verbs(prerm) == ["stop"]
    for unit in UNITS:
        # A template unit's instances are stopped through a quoted pattern.
        pattern = f"'{unit.replace('@.', '@*.')}'" if "@." in unit else unit
        assert re.search(rf"systemctl stop .*(?<!\S){re.escape(pattern)}(?!\S)", prerm), pattern
    assert systemctl_verbs(scripts["postrm"]) == ["daemon-reload"]
    for name in ("prerm", "postrm"):
        for forbidden in ("userdel", "deluser", "groupdel", "rm -r", "/var/lib/edge-"):
            assert forbidden not in code(scripts[name]), (name, forbidden)


def test_postinst_configure_runs_sysusers_and_tmpfiles_only(control: Path, tmp_path: Path) -> None:
    # The tools it calls are replaced by ones that write down their arguments.
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("systemd-sysusers", "systemd-tmpfiles", "systemctl"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >>"{calls}"\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{CLEAN_PATH}"}
    r = run(["sh", str(control / "postinst"), "configure", ""], env=env)
    assert r.returncode == 0, r.stderr
    assert "not enabled" in r.stdout
    lines = calls.read_text().splitlines()
    assert lines[:2] == [
        "systemd-sysusers edge-gateway.conf",
        "systemd-tmpfiles --create edge-gateway.conf",
    ]
    expected_systemctl = ["systemctl daemon-reload"] if Path("/run/systemd/system").is_dir() else []
    assert lines[2:] == expected_systemctl
    for script, arg in (("prerm", "remove"), ("postrm", "purge"), ("postrm", "remove")):
        r = run(["sh", str(control / script), arg], env=env)
        assert r.returncode == 0, (script, arg, r.stderr)


def test_no_staging_path_anywhere_and_shebangs_point_to_opt(
    extracted: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    needles = [
        str(tmp_path_factory.getbasetemp()).encode(),
        b"edge-gateway-deb.",
        f"{REPO}/".encode(),
    ]
    files = 0
    for dirpath, _dirs, names in os.walk(extracted):
        for n in names:
            p = Path(dirpath) / n
            if p.is_symlink() or not p.is_file():
                continue
            files += 1
            data = p.read_bytes()
            for needle in needles:
                assert needle not in data, f"{p.relative_to(extracted)} contains {needle!r}"
    assert files > 1000

    bin_dir = extracted / PREFIX.lstrip("/") / "bin"
    scripts = []
    for p in sorted(bin_dir.iterdir()):
        if p.is_file() and not p.is_symlink() and p.read_bytes()[:2] == b"#!":
            scripts.append(p.name)
            assert p.read_text().splitlines()[0] == f"#!{PREFIX}/bin/python", p.name
    assert "edge-gateway" in scripts
    activate = (bin_dir / "activate").read_text()
    assert re.search(rf"^VIRTUAL_ENV=([\"']?){PREFIX}\1$", activate, re.M), activate
    cfg = (extracted / PREFIX.lstrip("/") / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg and re.search(r"^version = 3\.11\.\d+$", cfg, re.M), cfg


def test_every_module_ships_compiled_for_its_installed_path(extracted: Path) -> None:
    site = extracted / SITE
    sources = [p for p in site.rglob("*.py") if "__pycache__" not in p.parts]
    assert len(sources) > 300
    for src in sources:
        pyc = Path(importlib.util.cache_from_source(str(src)))
        assert pyc.is_file(), f"{src.relative_to(extracted)} has no .pyc"
    for rel in ("gateway/cli.py", "gateway/edge/service.py", "grpc/__init__.py"):
        data = Path(importlib.util.cache_from_source(str(site / rel))).read_bytes()
        assert data[:4] == importlib.util.MAGIC_NUMBER, rel
        # Hash-checked: valid whatever mtime the install gives the source.
        assert int.from_bytes(data[4:8], "little") == 0b11, rel
        code = marshal.loads(data[16:])
        assert code.co_filename == f"/{SITE}/{rel}", code.co_filename


def test_the_packaged_venv_runs_the_demo_from_a_read_only_opt(
    extracted: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root for a private mount namespace: run as root", pytrace=False)
    if shutil.which("unshare") is None:
        pytest.fail("unshare not found: apt-get install -y util-linux", pytrace=False)
    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    opt = Path(PREFIX)
    created = not opt.exists()
    if created:
        opt.mkdir(parents=True)
    # Bound over /opt/edge-gateway, read-only as ProtectSystem=strict has it, only in
    # this namespace; the host's /opt is never touched.
    inner = (
        'mount --bind "$1" /opt/edge-gateway && mount -o remount,bind,ro /opt/edge-gateway'
        " && /opt/edge-gateway/bin/edge-gateway --version"
        " && /opt/edge-gateway/bin/edge-gateway demo --seconds 5"
    )
    try:
        r = run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
                "sh",
                str(extracted / PREFIX.lstrip("/")),
            ],
            timeout=300,
            cwd=empty,
            env={"PATH": CLEAN_PATH, "HOME": str(home), "LANG": "C.UTF-8"},
        )
    finally:
        if created:
            # Something else may have put files there meanwhile: not ours to remove.
            with contextlib.suppress(OSError):
                opt.rmdir()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert VERSION in r.stdout.splitlines()[0], r.stdout[:200]
    assert re.search(r"ledger logs\s+3 of 3 verified, 0 duplicates applied", out), out[-3000:]
    assert re.search(r"proofs verified\s+[1-9]\d* of a sample \(0 failed\)", out), out[-3000:]
    assert list(empty.iterdir()) == [], "the demo left files in its working directory"
