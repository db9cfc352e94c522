"""The package's rooms (see gateway/__init__.py) and the lines imports may not cross.

Every import statement of every module counts, at any depth (inside functions and
TYPE_CHECKING blocks too), except where a rule says module level only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"

ROOMS = ("formats", "common", "edge", "ledger", "lab")
# importer room -> rooms it may import anywhere. "gateway" is the package itself
# (__version__), "_pb" the generated protobuf code.
ALLOWED: dict[str, set[str]] = {
    "_pb": {"_pb"},
    "formats": {"formats", "_pb"},
    "common": {"common", "formats", "_pb", "gateway"},
    "edge": {"edge", "common", "formats", "_pb", "gateway"},
    "ledger": {"ledger", "common", "formats", "_pb", "gateway"},
    "lab": {"lab", "edge", "ledger", "common", "formats", "_pb", "gateway"},
    # The front door: the lab and the ledger node only inside the subcommands that run them.
    "cli": {"edge", "common", "formats", "_pb", "gateway"},
    "__main__": {"cli"},
}
DEFERRED: dict[str, set[str]] = {"cli": {"lab", "ledger"}}


def room_of_module(dotted: str) -> str:
    parts = dotted.split(".")
    if parts[0] != "gateway":
        raise ValueError(dotted)
    if len(parts) == 1:
        return "gateway"
    return parts[1]


def room_of_file(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:
        return rel.stem if rel.stem != "__init__" else "gateway"
    return rel.parts[0]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported gateway module, line, at module level) for each import of gateway code."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    # TYPE_CHECKING and try blocks at module level count as module level.
    for n in tree.body:
        if isinstance(n, ast.If | ast.Try):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write gateway.<room>")
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gateway":
                names = [f"gateway.{a.name}" for a in node.names]
            else:
                names = [node.module]
        for name in names:
            if name == "gateway" or name.startswith("gateway."):
                out.append((name, node.lineno, id(node) in top))
    return out


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_share" not in p.parts)


def test_every_module_is_in_a_room() -> None:
    for path in modules():
        room = room_of_file(path)
        assert room in ALLOWED or room == "gateway", f"{path}: not in a room {ROOMS}"


def test_no_import_crosses_a_room_line() -> None:
    crossings = []
    for path in modules():
        room = room_of_file(path)
        if room == "gateway":
            continue
        for name, line, top in imports(path):
            target = room_of_module(name)
            if name == "gateway.__version__":
                target = "gateway"
            ok = target in ALLOWED[room] or (not top and target in DEFERRED.get(room, set()))
            if not ok:
                rel = path.relative_to(PACKAGE.parent)
                crossings.append(f"{rel}:{line}: {room} imports {name}")
    assert not crossings, "imports across room lines:\n" + "\n".join(crossings)


def test_the_checker_sees_a_crossing(tmp_path: Path) -> None:
    """The rules above can fail: an edge module importing the lab is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from gateway.lab import sandbox\n")
    found = imports(bad)
    assert found == [("gateway.lab", 2, False)]
    assert "lab" not in ALLOWED["edge"]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("gateway.edge.service", ("gateway.lab", "gateway.ledger")),
        ("gateway.cli", ("gateway.lab", "gateway.ledger")),
        ("gateway.ledger.node", ("gateway.edge", "gateway.lab")),
        ("gateway.formats.tlogproof", ("gateway.edge", "gateway.lab", "gateway.ledger")),
    ],
)
def test_loading_a_room_loads_nothing_it_may_not(module: str, forbidden: tuple[str, ...]) -> None:
    """What Python actually loads, in a fresh interpreter (catches imports the AST misses,
    e.g. through a package __init__)."""
    code = (
        f"import sys, {module}; "
        "print('\\n'.join(m for m in sys.modules if m.startswith('gateway')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    loaded = [m for m in out if m.startswith(forbidden)]
    assert not loaded, f"importing {module} loads {loaded}"


def test_the_run_command_loads_no_lab_or_ledger_module() -> None:
    """`edge-gateway run` parses its command line with every sub-command's parser built;
    none of that may load the lab or the ledger node into the service's process."""
    code = (
        "import sys; from gateway import cli; "
        "cli.parser().parse_args(['run', '--config', '/nonexistent.toml']); "
        "print('\\n'.join(m for m in sys.modules if m.startswith('gateway')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "gateway.edge.config" in out
    loaded = [m for m in out if m.startswith(("gateway.lab", "gateway.ledger"))]
    assert not loaded, f"parsing `run` loads {loaded}"


def test_the_retired_batch_header_format_is_gone() -> None:
    """A batch is a range of the log and its checkpoint is its one signature: no module
    names the signed-header messages (batch.proto) or the header helpers they had."""
    header_names = {
        "batch_pb2",
        "BatchHeader",
        "SignedBatch",
        "BatchInvalid",
        "HeaderFields",
        "encode_header",
        "parse_header",
        "header_hash",
        "verify_batch",
        "sign_header",
        "SubmitBatch",
        "ListBatches",
    }
    users = []
    for path in modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            named = (
                {a.name for a in node.names} if isinstance(node, ast.ImportFrom) else set()
            ) | ({node.attr} if isinstance(node, ast.Attribute) else set())
            if isinstance(node, ast.FunctionDef):
                named.add(node.name)
            if named & header_names:
                users.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not users, "the retired header format is used at:\n" + "\n".join(users)
    assert not list((PACKAGE.parent / "protos").rglob("batch.proto"))
