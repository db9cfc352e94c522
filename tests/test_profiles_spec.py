"""Profile files: a mistake is one line naming the file, the line, the key and the value.

Also the set-level rules (one name@version, one owner per topic filter), key
files (secrets not readable by others, values never echoed), the gateway
config's [profiles] table, and the `edge-gateway profiles` commands.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from gateway import cli
from gateway.common.errors import EXIT_CONFIG, ConfigError
from gateway.edge.config import parse_gateway_config
from gateway.edge.profiles import ProfileError, ProfileSet, parse_profile, read_profiles
from gateway.edge.profiles.keys import read_hmac_keys, read_pseudonym_key
from gateway.edge.profiles.spec import parse_profile_text
from gateway.edge.profiles.tomlpos import key_lines

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "firmware_profiles"
SAMPLES = PROFILES / "samples"

MINIMAL = """\
name = "acme-meter"
version = 3
encoding = "json"
kind = "meter.reading"

[topics]
filters = ["acme/+/up"]
device_id_level = 1

[sequence]
field = "seq"

[[fields]]
name = "seq"
pointer = "/seq"
type = "int"

[[fields]]
name = "energy_wh"
pointer = "/e"
type = "int"
min = 0
"""


def write(tmp: Path, text: str, name: str = "acme.toml") -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(tmp: Path, text: str) -> str:
    with pytest.raises(ProfileError) as ei:
        parse_profile(write(tmp, text))
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def line_of(text: str, needle: str) -> int:
    """The last line holding `needle`."""
    return max(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def test_minimal_profile_loads(tmp_path: Path) -> None:
    p = parse_profile(write(tmp_path, MINIMAL))
    assert p.id == "acme-meter@3"
    assert p.filters == ("acme/+/up",)
    assert [f.name for f in p.fields] == ["seq", "energy_wh"]
    assert p.auth is None and p.time is None and p.rate_limit is None


def test_every_shipped_profile_loads_as_a_set() -> None:
    names = sorted(p.id for p in read_profiles(PROFILES))
    assert names == [
        "cdr-usage@1",
        "cellsite-power@1",
        "esim-lifecycle@1",
        "lte-m-tracker@1",
        "nbiot-meter@1",
    ]


@pytest.mark.parametrize(
    ("old", "new", "key", "needle"),
    [
        ('type = "int"\nmin = 0', 'type = "u17"\nmin = 0', "fields[1].type = 'u17'", "u17"),
        (
            'pointer = "/e"',
            'pointr = "/e"',
            "fields[1].pointr = '/e': unknown key; did you mean pointer?",
            "pointr",
        ),
        ('pointer = "/e"', 'pointer = "e"', "fields[1].pointer = 'e'", 'pointer = "e"'),
        ("device_id_level = 1", "device_id_level = 0", "topics.filters[0]", '"acme/+/up"'),
        ('encoding = "json"', 'encoding = "xml"', "encoding = 'xml'", "xml"),
        ("version = 3", "version = true", "version = True", "version"),
        ("min = 0", "min = 10\nmax = 1", "fields[1].min = 10", "min = 10"),
        (
            'field = "seq"',
            'field = "sequence"',
            "sequence.field = 'sequence'",
            'field = "sequence"',
        ),
        ('name = "energy_wh"', 'name = "seq"', "fields[1].name = 'seq'", 'name = "seq"'),
        ('name = "energy_wh"', 'name = "Energy"', "fields[1].name = 'Energy'", "Energy"),
        ('filters = ["acme/+/up"]', 'filters = ["acme/+x/up"]', "topics.filters[0]", "+x"),
    ],
)
def test_error_names_file_line_key_and_value(
    tmp_path: Path, old: str, new: str, key: str, needle: str
) -> None:
    text = MINIMAL.replace(old, new, 1)
    assert text != MINIMAL
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"profile {tmp_path / 'acme.toml'}:{line_of(text, needle)}: "), msg
    assert key in msg


def test_missing_key_names_where_it_belongs(tmp_path: Path) -> None:
    text = MINIMAL.replace('[sequence]\nfield = "seq"\n', "")
    msg = error_of(tmp_path, text)
    assert "sequence is missing" in msg
    text = MINIMAL.replace('pointer = "/e"\n', "")
    msg = error_of(tmp_path, text)
    assert f":{line_of(text, 'energy_wh') - 1}: fields[1].pointer is missing" in msg


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL.replace("version = 3", "version = = 3"))
    assert "not valid TOML" in msg and "line 2" in msg


def test_binary_layout_is_checked(tmp_path: Path) -> None:
    text = """\
name = "bin"
version = 1
encoding = "binary"
kind = "x"
[binary]
byte_order = "little"
length = 6
[sequence]
field = "seq"
[[fields]]
name = "seq"
offset = 0
type = "u32"
[[fields]]
name = "v"
offset = 3
type = "u16"
"""
    msg = error_of(tmp_path, text)
    assert ":16: fields[1].offset = 3: overlaps fields[0] (seq)" in msg
    msg = error_of(tmp_path, text.replace("offset = 3", "offset = 5"))
    assert "ends at byte 7, past the record's 6 bytes" in msg
    p = parse_profile(write(tmp_path, text.replace("offset = 3", "offset = 4")))
    assert p.record_length == 6


def test_tomlpos_finds_keys_in_arrays_of_tables_and_inline_tables() -> None:
    text = (
        'a = 1\n[t]\nx = [\n  "p",\n  { k = 2 },\n]\n'
        '[[f]]\nn = 1\n[[f]]\nn = """\nz = 9\n"""\nm = 2\n'
    )
    tomllib.loads(text)
    lines = key_lines(text)
    assert lines[("a",)] == 1
    assert lines[("t", "x", 1)] == 5
    assert lines[("t", "x", 1, "k")] == 5
    assert lines[("f", 1, "n")] == 10
    assert lines[("f", 1, "m")] == 13
    assert ("z",) not in lines and ("f", 1, "z") not in lines


def test_two_profiles_with_one_id_or_one_filter_are_refused(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL, "a.toml")
    write(tmp_path, MINIMAL, "b.toml")
    with pytest.raises(ProfileError, match=r"b\.toml:1: acme-meter@3 is also defined in .*a\.toml"):
        read_profiles(tmp_path)
    write(tmp_path, MINIMAL.replace("version = 3", "version = 4"), "b.toml")
    with pytest.raises(
        ProfileError,
        match=r"b\.toml:7: topics.filters 'acme/\+/up' is also claimed by acme-meter@3",
    ):
        read_profiles(tmp_path)
    write(
        tmp_path,
        MINIMAL.replace("version = 3", "version = 4").replace("acme/+/up", "acme/+/v4"),
        "b.toml",
    )
    assert len(read_profiles(tmp_path)) == 2


def test_shared_subscription_prefix_is_stripped(tmp_path: Path) -> None:
    p = parse_profile(write(tmp_path, MINIMAL.replace("acme/+/up", "$share/edge/acme/+/up")))
    assert p.filters == ("acme/+/up",)


def hmac_profile(tmp: Path) -> Path:
    text = MINIMAL + '\n[auth]\nscheme = "hmac-sha256"\nkeys_file = "acme.keys"\n'
    return write(tmp, text.replace("[[fields]]", "[[fields]]", 1))


def test_secret_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    hmac_profile(profiles)
    keys = tmp_path / "keys"
    keys.mkdir()
    secret = "00112233445566778899aabbccddeeff"
    (keys / "acme.keys").write_text(f'[devices]\n"m-1" = "{secret}"\n')
    (keys / "acme.keys").chmod(0o644)
    with pytest.raises(ProfileError, match=r"readable by others \(mode 0644\): chmod 600 it"):
        ProfileSet.load(profiles, gateway_id="g", keys_dir=keys)
    (keys / "acme.keys").chmod(0o600)
    assert "acme-meter@3" in ProfileSet.load(profiles, gateway_id="g", keys_dir=keys).names()


def test_key_file_errors_never_quote_the_key(tmp_path: Path) -> None:
    bad = "00112233445566778899aabbccddeeZZ"
    path = tmp_path / "k"
    path.write_text(f'[devices]\n"m-1" = "ok"\n"m-2" = "{bad}"\n')
    path.chmod(0o600)
    with pytest.raises(ProfileError) as ei:
        read_hmac_keys(path, "profile x auth.keys_file")
    assert f"{path}:2: device 'm-1'" in str(ei.value)
    path.write_text(f'[devices]\n"m-2" = "{bad}"\n')
    with pytest.raises(ProfileError) as ei:
        read_hmac_keys(path, "profile x auth.keys_file")
    assert bad not in str(ei.value) and "m-2" in str(ei.value)
    path.write_text(bad + "\n")
    with pytest.raises(ProfileError) as ei:
        read_pseudonym_key(path)
    assert bad not in str(ei.value) and "openssl rand -hex 32" in str(ei.value)


def test_pseudonymised_profile_needs_the_pseudonym_key(tmp_path: Path) -> None:
    shutil.copy(PROFILES / "cdr-usage.toml", tmp_path)
    with pytest.raises(ProfileError) as ei:
        ProfileSet.load(tmp_path, gateway_id="g")
    text = (tmp_path / "cdr-usage.toml").read_text()
    line = line_of(text, 'name = "imsi"') - 1
    assert f"cdr-usage.toml:{line}: field imsi" in str(ei.value)
    assert "profiles.pseudonym_key_file" in str(ei.value)


GATEWAY_TOML = """\
[gateway]
id = "edge-t-1"
[hsm]
token_label = "t"
pin_file = "/etc/edge-gateway/pin"
[mqtt]
plaintext = true
[spool]
path = "/var/lib/edge-gateway/spool.db"
[forwarder]
nodes = [{ id = "n1", address = "127.0.0.1:7001" }]
plaintext = true
[api]
plaintext = true
"""


def test_config_without_profiles_keeps_json_only() -> None:
    cfg = parse_gateway_config(tomllib.loads(GATEWAY_TOML), Path("/etc/edge-gateway/g.toml"))
    assert cfg.profiles is None
    ps = ProfileSet.from_config(cfg)
    assert ps.names() == ("json@1",)


def test_config_profiles_table(tmp_path: Path) -> None:
    text = GATEWAY_TOML + '[profiles]\ndir = "profiles"\nfallback = "none"\nshare_group = "edge"\n'
    cfg = parse_gateway_config(tomllib.loads(text), tmp_path / "gateway.toml")
    assert cfg.profiles is not None
    assert cfg.profiles.dir == tmp_path / "profiles"
    assert cfg.profiles.keys_dir == Path("/etc/edge-gateway/keys")
    assert cfg.profiles.fallback is None and cfg.profiles.share_group == "edge"
    with pytest.raises(ConfigError, match=r"profiles\.dirr"):
        parse_gateway_config(
            tomllib.loads(GATEWAY_TOML + '[profiles]\ndirr = "x"\n'), tmp_path / "g.toml"
        )
    with pytest.raises(ConfigError, match=r"profiles\.share_group"):
        parse_gateway_config(
            tomllib.loads(GATEWAY_TOML + '[profiles]\nshare_group = "a/b"\n'), tmp_path / "g.toml"
        )


# ---- the CLI ----------------------------------------------------------------


def test_cli_profiles_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["profiles", "list", "--dir", str(PROFILES)]) == 0
    out = capsys.readouterr().out
    for name in ("nbiot-meter@1", "lte-m-tracker@1", "cellsite-power@1", "json@1"):
        assert name in out
    assert re.search(r"nbiot-meter@1\s+cbor\s+meter\.reading\s+meters/nbiot/\+/up", out)


def test_cli_profiles_check_ok_and_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["profiles", "check", str(PROFILES / "cellsite-power.toml")]) == 0
    assert "ok: cellsite-power@1 (binary, 10 fields" in capsys.readouterr().out
    broken = write(tmp_path, MINIMAL.replace('type = "int"\nmin = 0', 'type = "float"\nmin = 0'))
    assert cli.main(["profiles", "check", str(broken)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"edge-gateway: profile {broken}:{line_of(MINIMAL, 'min = 0') - 1}:")
    assert "fields[1].type = 'float'" in err[0]


def test_cli_profiles_decode_prints_the_transaction_or_the_rejection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    shutil.copytree(SAMPLES / "keys", keys)
    for f in keys.iterdir():
        f.chmod(0o600)
    common = [
        "--dir",
        str(PROFILES),
        "--keys-dir",
        str(keys),
        "--pseudonym-key-file",
        str(keys / "pseudonym.key"),
        "--received-ms",
        "1767225660000",
        "--gateway-id",
        "edge-sample-01",
    ]
    manifest = tomllib.loads((SAMPLES / "nbiot-meter" / "manifest.toml").read_text())
    first = manifest["sample"][0]
    code = cli.main(
        [
            "profiles",
            "decode",
            "nbiot-meter",
            str(SAMPLES / "nbiot-meter" / first["file"]),
            "--topic",
            first["topic"],
            *common,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(out)
    assert doc["tx_id"] == first["tx_id"]
    assert doc["profile"] == "nbiot-meter@1" and doc["device_id"] == "meter-0001"
    assert doc["fields"]["voltage_v"] == 230.4

    code = cli.main(
        [
            "profiles",
            "decode",
            "cellsite-power@1",
            str(SAMPLES / "cellsite-power" / "one-byte-long.bin"),
            *common,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.startswith("rejected: not_decodable: record is 28 bytes")

    code = cli.main(
        [
            "profiles",
            "decode",
            "nbiot-meter",
            str(SAMPLES / "nbiot-meter" / first["file"]),
            "--topic",
            "meters/lora/meter-0001/up",
            *common,
        ]
    )
    assert code == 1
    assert capsys.readouterr().err.startswith("rejected: unknown_topic: ")

    code = cli.main(["profiles", "decode", "no-such", str(PROFILES / "nbiot-meter.toml"), *common])
    assert code == 1
    assert capsys.readouterr().err.startswith("rejected: unknown_profile: ")


def test_cli_decode_takes_a_profile_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof = write(tmp_path, MINIMAL)
    payload = tmp_path / "p.json"
    payload.write_bytes(b'{"seq": 5, "e": 17}')
    assert cli.main(["profiles", "decode", str(prof), str(payload), "--device", "m-9"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["profile"] == "acme-meter@3"
    assert doc["device_id"] == "m-9" and doc["device_seq"] == 5
    assert doc["fields"] == {"energy_wh": 17}


def test_the_readme_example_is_a_valid_profile() -> None:
    readme = (PROFILES / "README.md").read_text(encoding="utf-8")
    m = re.search(r"## A complete example.*?```toml\n(.*?)```", readme, re.S)
    assert m is not None
    p = parse_profile_text(m.group(1), PROFILES / "README.md")
    assert p.id == "acme-meter@3"
    assert p.auth is not None and p.rate_limit is not None and p.time is not None
    assert p.field("status").flags == ("tamper", "", "low_battery")
    assert p.receipts is not None and p.receipts.topic == "receipts/{device}"


def test_parse_profile_text_is_pure() -> None:
    p = parse_profile_text(MINIMAL, Path("<memory>"))
    assert p.source == Path("<memory>")


def test_receipts_are_off_unless_a_profile_opts_in(tmp_path: Path) -> None:
    assert parse_profile(write(tmp_path, MINIMAL)).receipts is None
    off = parse_profile(write(tmp_path, MINIMAL + "\n[receipts]\ntopic = 'r/{device}'\n"))
    assert off.receipts is None
    on = parse_profile(write(tmp_path, MINIMAL + "\n[receipts]\nenabled = true\n"))
    assert on.receipts is not None
    assert on.receipts.topic_for("m-1") == "receipts/m-1"
    assert on.receipts.topic_filter == "receipts/+"
    own = parse_profile(
        write(tmp_path, MINIMAL + "\n[receipts]\nenabled = true\ntopic = 'acme/{device}/rx'\n")
    )
    assert own.receipts is not None and own.receipts.topic_for("m-1") == "acme/m-1/rx"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("enabled = 1", r"receipts\.enabled = 1: expected true or false"),
        ("enabled = true\ntopic = 'receipts/+'", r"receipts\.topic = .*\{device\} as one whole"),
        ("enabled = true\ntopic = 'r/x{device}'", r"receipts\.topic = .*\{device\} as one whole"),
        ("enabled = true\ntopic = 'r/{device}/#'", r"receipts\.topic = .*no '\+', '#'"),
        ("enabled = true\ntopic = '$SYS/{device}'", r"receipts\.topic = .*leading '\$'"),
        ("enabled = true\ntopic = 'acme/{device}/up'", r"receipts\.topic = .*devices publish"),
        ("enable = true", r"receipts\.enable = True: unknown key; did you mean enabled\?"),
    ],
)
def test_receipt_key_mistakes_are_one_line(tmp_path: Path, table: str, message: str) -> None:
    path = write(tmp_path, MINIMAL + "\n[receipts]\n" + table + "\n")
    with pytest.raises(ProfileError) as e:
        parse_profile(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"profile {path}:")
    assert re.search(message, text), text


def test_a_receipt_topic_another_profile_claims_is_refused(tmp_path: Path) -> None:
    write(tmp_path, MINIMAL + "\n[receipts]\nenabled = true\ntopic = 'other/{device}/up'\n")
    other = MINIMAL.replace("acme-meter", "other-meter").replace("acme/+/up", "other/+/up")
    write(tmp_path, other, "other.toml")
    with pytest.raises(ProfileError, match=r"receipts\.topic 'other/\{device\}/up' is a topic"):
        read_profiles(tmp_path)
