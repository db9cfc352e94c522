"""The bench's measuring parts that need no running system: how a profiler sample is put
in a stage, which (device, seq) a phase published, and what the peer's stand-in server
counts. The whole bench runs in tests/test_bench_smoke.py; the peer bench in none."""

from __future__ import annotations

from gateway.lab import cpustages, loadgen, peerbench

GW = "/work/x/gateway"
PAHO = "/venv/lib/python3.11/site-packages/paho/mqtt/client.py"


def frame(func: str, path: str, line: int = 1) -> str:
    return f"{func} ({path}:{line})"


def test_innermost_known_frame_names_the_stage() -> None:
    stack = [
        frame("Client._packet_read", PAHO),
        frame("MqttIngest._on_message", f"{GW}/edge/ingest.py"),
        frame("JsonDecoder.decode", f"{GW}/edge/profiles/builtin.py"),
        frame("loads", "/usr/lib/python3.11/json/__init__.py"),
    ]
    assert cpustages.stage_of(stack) == "decode"
    assert cpustages.stage_of(stack[:2]) == "intake hand-off"
    assert cpustages.stage_of(stack[:1]) == "MQTT client library"


def test_helpers_count_for_their_caller_and_entry_points_for_nothing() -> None:
    leaf = frame("leaf_hash", f"{GW}/formats/merkle.py")
    decode = frame("JsonDecoder.decode", f"{GW}/edge/profiles/builtin.py")
    cut = frame("Batcher.cut", f"{GW}/edge/batcher.py")
    assert cpustages.stage_of([decode, leaf]) == "decode"
    assert cpustages.stage_of([cut, leaf]) == "batch, Merkle, sign"
    assert cpustages.stage_of([leaf]) == "batch, Merkle, sign"
    loop = [frame("run", f"{GW}/edge/service.py"), frame("select", "/usr/lib/selectors.py")]
    assert cpustages.stage_of(loop) == cpustages.RUNTIME


def test_spool_frames_by_thread() -> None:
    stack = [frame("Spool._commit_appends", f"{GW}/edge/spool.py")]
    assert cpustages.stage_of(stack, "spool-writer") == "spool writer (insert, commit)"
    assert cpustages.stage_of(stack, "spool-read_0") == "spool reads"
    assert cpustages.stage_of(stack, "paho-mqtt-client-x").startswith("spool calls")


def test_raw_profile_lines_with_semicolons_in_the_command() -> None:
    text = (
        'process 10:"python -m gateway run";process 11:"python -c from x import y; y()";'
        f"thread (12): spool-writer;{frame('Spool.run', f'{GW}/edge/spool.py')} 7\n"
        f'process 10:"python -m gateway run";thread (10): MainThread;'
        f"{frame('Forwarder.send', f'{GW}/edge/forwarder.py')} 3\n"
    )
    samples = cpustages.parse_raw(text)
    assert samples[(11, 12)] == {"spool writer (insert, commit)": 7}
    assert samples[(10, 10)] == {"forward": 3}


def test_thread_cpu_is_split_by_samples_and_unsampled_threads_named() -> None:
    prof = cpustages.StageProfile(
        by_role={"intake": {"decode": 0.2, "spool writer (insert, commit)": 0.3}}
    )
    assert prof.per_tx_us(10_000) == {
        "intake": {"spool writer (insert, commit)": 30.0, "decode": 20.0}
    }
    assert prof.per_tx_us(0) == {}


def test_published_pairs_and_their_times() -> None:
    job = loadgen.Job(port=1, devices=5, payload_bytes=120, seconds=1, start_seq=100, rate=10.0)
    pairs = loadgen.published_pairs(job, (4, 3))
    # Process 0 owns devices 0, 2, 4; process 1 owns 1, 3.
    assert pairs == {
        ("bench-00000", 100),
        ("bench-00002", 100),
        ("bench-00004", 100),
        ("bench-00000", 101),
        ("bench-00001", 100),
        ("bench-00003", 100),
        ("bench-00001", 101),
    }
    # Process 0 sends at 6 msg/s: its 4th message (device 0, seq 101) after 0.5 s.
    assert peerbench.publish_offset(job, 2, ("bench-00000", 101)) == 0.5


def test_stand_in_reads_every_reading_of_a_telemetry_message() -> None:
    msg = (
        b'{"bench-00001": [{"ts": 1, "values": {"seq": 7, "kind": "k"}},'
        b' {"ts": 2, "values": {"seq": 8}}], "bench-00002": {"ts": 3, "values": {"seq": 9}}}'
    )
    assert peerbench._readings(msg) == [("bench-00001", 7), ("bench-00001", 8), ("bench-00002", 9)]
    assert peerbench._readings(b"not json") == []
