"""`edge-gateway profiles decode` binds only the keys of the profile it decodes: another
profile in the directory whose keys file is absent does not stop it."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from gateway import cli
from gateway.common.errors import EXIT_CONFIG

PROFILES = Path(__file__).resolve().parent.parent / "firmware_profiles"
SAMPLES = PROFILES / "samples"
MANIFEST = tomllib.loads((SAMPLES / "cellsite-power" / "manifest.toml").read_text())


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A profiles directory with cellsite-power (no device keys) and nbiot-meter (HMAC,
    keys file nbiot-meter.toml), and a keys directory without that file."""
    profiles, keys = tmp_path / "profiles", tmp_path / "keys"
    profiles.mkdir()
    keys.mkdir()
    for name in ("cellsite-power.toml", "nbiot-meter.toml"):
        shutil.copy(PROFILES / name, profiles / name)
    assert 'keys_file = "nbiot-meter.toml"' in (profiles / "nbiot-meter.toml").read_text()
    return profiles, keys


def decode(profile: str, payload: Path, profiles: Path, keys: Path, *extra: str) -> int:
    return cli.main(
        [
            "profiles",
            "decode",
            profile,
            str(payload),
            "--dir",
            str(profiles),
            "--keys-dir",
            str(keys),
            "--received-ms",
            str(MANIFEST["received_ms"]),
            "--gateway-id",
            MANIFEST["gateway_id"],
            *extra,
        ]
    )


def test_decode_ignores_another_profiles_missing_keys_file(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    profiles, keys = dirs
    sample = MANIFEST["sample"][0]
    code = decode(
        "cellsite-power",
        SAMPLES / "cellsite-power" / sample["file"],
        profiles,
        keys,
        "--topic",
        sample["topic"],
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["profile"] == "cellsite-power@1"
    assert doc["tx_id"] == sample["tx_id"]
    assert doc["fields_canonical"] == sample["fields"]


def test_decode_still_routes_topics_by_the_whole_set(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # nbiot-meter is not bound to keys here, yet its topics are still its own.
    profiles, keys = dirs
    sample = MANIFEST["sample"][0]
    code = decode(
        "cellsite-power",
        SAMPLES / "cellsite-power" / sample["file"],
        profiles,
        keys,
        "--topic",
        "meters/nbiot/meter-0001/up",
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("rejected: unknown_topic: ")
    assert "cellsite-power@1" in err


def test_decoding_the_profile_whose_keys_file_is_missing_names_the_file(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    profiles, keys = dirs
    manifest = tomllib.loads((SAMPLES / "nbiot-meter" / "manifest.toml").read_text())
    first = manifest["sample"][0]
    code = decode(
        "nbiot-meter",
        SAMPLES / "nbiot-meter" / first["file"],
        profiles,
        keys,
        "--topic",
        first["topic"],
    )
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{keys / 'nbiot-meter.toml'} does not exist" in err


def test_an_unknown_profile_is_still_a_rejection(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    profiles, keys = dirs
    code = decode("no-such", SAMPLES / "cellsite-power" / "valid-1.bin", profiles, keys)
    assert code == 1
    assert capsys.readouterr().err.startswith("rejected: unknown_profile: ")
