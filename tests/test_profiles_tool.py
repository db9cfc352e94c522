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


def decode(profile: str, payload: Path, dirs: tuple[Path, Path], *extra: str) -> int:
    profiles, keys = dirs
    argv = ["profiles", "decode", profile, str(payload), "--dir", str(profiles)]
    argv += ["--keys-dir", str(keys), "--received-ms", str(MANIFEST["received_ms"])]
    return cli.main([*argv, "--gateway-id", MANIFEST["gateway_id"], *extra])


def decode_first_sample(profile: str, dirs: tuple[Path, Path], topic: str = "") -> int:
    """Decode the first sample in `profile`'s manifest, on its own topic or on `topic`."""
    manifest = tomllib.loads((SAMPLES / profile / "manifest.toml").read_text())
    sample = manifest["sample"][0]
    payload = SAMPLES / profile / sample["file"]
    return decode(profile, payload, dirs, "--topic", topic or sample["topic"])


def test_decode_ignores_another_profiles_missing_keys_file(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = decode_first_sample("cellsite-power", dirs)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    sample = MANIFEST["sample"][0]
    assert doc["profile"] == "cellsite-power@1"
    assert doc["tx_id"] == sample["tx_id"]
    assert doc["fields_canonical"] == sample["fields"]


def test_decode_still_routes_topics_by_the_whole_set(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # nbiot-meter is not bound to keys here, yet its topics are still its own.
    code = decode_first_sample("cellsite-power", dirs, topic="meters/nbiot/meter-0001/up")
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("rejected: unknown_topic: ")
    assert "cellsite-power@1" in err


def test_decoding_the_profile_whose_keys_file_is_missing_names_the_file(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = decode_first_sample("nbiot-meter", dirs)
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    _, keys = dirs
    assert f"{keys / 'nbiot-meter.toml'} does not exist" in err


def test_an_unknown_profile_is_still_a_rejection(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = decode("no-such", SAMPLES / "cellsite-power" / "valid-1.bin", dirs)
    assert code == 1
    assert capsys.readouterr().err.startswith("rejected: unknown_profile: ")
