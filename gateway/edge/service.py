"""The service: start every stage, watch them, stop them along one path.

Start order: the spool's instance lock (one gateway per spool), PIN, spool, HSM,
forwarder and batcher resume, API server, MQTT; READY=1 once the subscription is
up. SIGTERM (and tests, and fatal errors) take the same stop path: stop intake,
flush the group commit, cut and sign the open batch, forward until the drain
deadline, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from gateway import __version__
from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.common.errors import EXIT_OK, EXIT_SOFTWARE, ConfigError
from gateway.common.grpcutil import add_port
from gateway.common.notify import Notifier
from gateway.edge import authz, metrics, rotation, rotator
from gateway.edge.api import SERVICE_NAME, GatewayApi, server_options
from gateway.edge.batcher import Batcher
from gateway.edge.config import GatewayConfig, check_certificates
from gateway.edge.forwarder import Forwarder
from gateway.edge.ingest import Intake, make_client
from gateway.edge.intakeproc import IntakePool, crash_record, fault_hook
from gateway.edge.poison import Guard, exit_after
from gateway.edge.profiles import ProfileSet
from gateway.edge.receipts import ReceiptPublisher, receipt_specs
from gateway.edge.signer import Signer
from gateway.edge.spool import Spool, claim_instance, now_ms, prune, prune_rejects

log = logging.getLogger("gateway.edge.service")
INTAKE_HEALTH = "edgegateway.v1.Intake"
# A stage that has not made progress (nor been idle and healthy) for this long
# stops the watchdog pings, so systemd restarts the service.
STUCK_AFTER_S = 60.0
DRAIN_TIMEOUT_S = 20.0
RESUME_FRACTION = 0.9
PRUNE_EVERY_S = 30.0
# After an internal error the stop drains as usual, or the process exits this much later.
FATAL_EXIT_AFTER_S = 60.0
# Transactions waiting to be batched beyond which MQTT intake waits for the batcher.
# With intake in processes of its own, the window no longer guards the batcher's share of
# one GIL; it bounds how far the spool runs ahead of batching. 8 batches (4,000
# transactions at max_tx 500, about 0.3 s at the bench's rate) held intake back whenever a
# cut's cursor reached it late: 10,100-12,100 tx/s committed against 12,700-13,900 with
# 32, intake 55-65 against 45-49 µs per transaction (issue 14, alternating runs).
FLOW_WINDOW_BATCHES = 32


_box_registered = False


@dataclass(frozen=True, slots=True)
class Started:
    api_port: int
    metrics_port: int | None


class Gateway:
    def __init__(self, cfg: GatewayConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier.from_environ(os.environ)
        self.stop_event = asyncio.Event()
        self.started_at = time.monotonic()
        self.paused_reason: str | None = None
        self.spool: Spool | None = None
        self.signer: Signer | None = None
        self._rotations: set[asyncio.Future[None]] = set()
        self.batcher: Batcher | None = None
        self.forwarder: Forwarder | None = None
        self.mqtt: IntakePool | None = None
        self.api_intake: Intake | None = None
        self.guard: Guard | None = None
        self.profiles: ProfileSet | None = None
        self.receipts: ReceiptPublisher | None = None
        self.ready = False
        self.exit_code = EXIT_OK
        self._instance_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        # A forwarder loop may legitimately sleep a full backoff plus a call deadline.
        fw = cfg.forwarder
        self._stuck_after = max(STUCK_AFTER_S, fw.backoff_max_s + 2 * fw.call_timeout_s + 10)

    def request_stop(self) -> None:
        self.stop_event.set()

    # ---- status ------------------------------------------------------------

    def status(self) -> gateway_pb2.GatewayStatus:
        st = gateway_pb2.GatewayStatus(
            gateway_id=self.cfg.gateway_id, version=__version__, quorum=self.cfg.forwarder.quorum
        )
        st.uptime_s = int(time.monotonic() - self.started_at)
        if self.spool is not None:
            child = self.mqtt
            st.transactions_stored = self.spool.stored + (child.stored if child else 0)
            st.transactions_rejected = self.spool.rejects + (child.rejects if child else 0)
        if self.batcher is not None:
            st.spool_depth = self.batcher.depth
            oldest = self.batcher.oldest_pending_ms
            st.oldest_pending_age_s = (
                0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
            )
            st.last_signed_seq = self.batcher.next_seq - 1
        if self.forwarder is not None:
            st.last_committed_seq = self.forwarder.last_committed_seq
            for n in self.forwarder.nodes:
                st.ledger_nodes.add(
                    node_id=n.ref.node_id,
                    address=n.ref.address,
                    state=n.state,
                    log_size=n.log_size or 0,
                    last_error=n.last_error,
                )
        if self.signer is not None:
            st.hsm_state = self.signer.state
            if self.signer.info is not None:
                st.key_id = self.signer.info.key_id.hex()
            if self.batcher is not None:
                st.key_id = self.batcher.key_id.hex()  # after a key rotation, the new key
        st.mqtt_connected = bool(self.mqtt and self.mqtt.connected)
        st.intake_paused = self.paused_reason is not None
        st.intake_paused_reason = self.paused_reason or ""
        # /proc may be partly hidden by the unit's sandbox; status must not fail for it.
        with contextlib.suppress(OSError, psutil.Error):
            st.cpu_percent = psutil.cpu_percent(interval=None)
        with contextlib.suppress(OSError, psutil.Error):
            st.memory_percent = psutil.virtual_memory().percent
        with contextlib.suppress(OSError):
            st.spool_disk_free_bytes = float(
                psutil.disk_usage(str(self.cfg.spool.path.parent)).free
            )
        return st

    def summary(self) -> str:
        st = self.status()
        return (
            f"stored {st.transactions_stored}, depth {st.spool_depth}, signed seq "
            f"{st.last_signed_seq}, committed seq {st.last_committed_seq}, mqtt "
            f"{'up' if st.mqtt_connected else 'down'}"
            + (f", intake paused: {st.intake_paused_reason}" if st.intake_paused else "")
        )

    # ---- back-pressure -----------------------------------------------------

    def _pressure(self) -> str | None:
        """Why intake must pause now, or None. Hysteresis keeps it from flapping."""
        assert self.mqtt is not None
        depth = self.mqtt.load()
        limit = self.cfg.spool.max_depth
        paused = self.paused_reason is not None
        if depth >= limit or (
            paused
            and depth >= limit * RESUME_FRACTION
            and self.paused_reason is not None
            and self.paused_reason.startswith("spool depth")
        ):
            return f"spool depth {depth} at limit {limit}"
        try:
            free = psutil.disk_usage(str(self.cfg.spool.path.parent)).free
        except OSError:
            return None
        need = self.cfg.spool.min_free_bytes
        if free < need or (
            paused
            and self.paused_reason is not None
            and self.paused_reason.startswith("spool disk")
            and free < need * 1.1
        ):
            return f"spool disk free {free} bytes below {need}"
        assert self.batcher is not None
        oldest = self.batcher.oldest_pending_ms
        age = 0.0 if oldest is None else time.time() - oldest / 1000
        max_age = self.cfg.spool.max_pending_age_s
        if age >= max_age or (
            paused
            and self.paused_reason is not None
            and self.paused_reason.startswith("oldest pending")
            and age >= max_age * RESUME_FRACTION
        ):
            return f"oldest pending transaction {age:.0f} s old, limit {max_age:.0f} s"
        return None

    async def _prune(self) -> None:
        """Retention: committed batches older than the last `retention_batches` leave the
        spool (0 keeps everything). A ledger node that lost more than that must be
        restored from a peer. Recorded rejects leave it after rejects.retention_s, or
        oldest first beyond rejects.max_kept."""
        if self.spool is None or self.forwarder is None:
            return
        rj = self.cfg.rejects
        gone = 0
        for _ in range(20):  # bounded: at most 200,000 rejects a round
            n = await asyncio.to_thread(
                prune_rejects, self.spool, now_ms() - int(rj.retention_s * 1000), rj.max_kept
            )
            gone += n
            if not n:
                break
        if gone:
            log.info(
                "retention: pruned %d rejects (older than %.0f s or beyond %d kept)",
                gone,
                rj.retention_s,
                rj.max_kept,
            )
        keep = self.cfg.spool.retention_batches
        keep_from = self.forwarder.last_committed_seq - keep + 1
        if keep == 0 or keep_from <= 0:
            return
        total = 0
        for _ in range(50):  # bounded: at most 10,000 batches a round
            n = await asyncio.to_thread(prune, self.spool, keep_from)
            total += n
            if not n:
                break
        if total:
            log.info("retention: pruned %d batches below seq %d", total, keep_from)

    async def _monitor(self) -> None:
        assert self.batcher is not None and self.forwarder is not None and self.mqtt is not None
        interval = self.notifier.watchdog_interval_s() or 5.0
        last_status = 0.0
        last_prune = time.monotonic() - PRUNE_EVERY_S  # a first round at start
        while not self.stop_event.is_set():
            reason = self._pressure()
            # Intake may also have paused itself at the depth limit between looks.
            if reason is None and self.mqtt.paused:
                self.mqtt.resume()
            elif reason is not None:
                # Every look, to every intake process: one may have paused itself (depth)
                # while another has not seen this reason (disk, age).
                self.mqtt.pause()
            metrics.mqtt_connected.set(1 if self.mqtt.connected else 0)
            self.mqtt.release()  # in case no cut came to release the flow window
            if self.api_intake is not None:
                self.api_intake.flush_summaries()
            if reason != self.paused_reason:
                serving = health_pb2.HealthCheckResponse
                if reason is not None:
                    log.warning("intake paused: %s", reason)
                    await self.health.set(INTAKE_HEALTH, serving.NOT_SERVING)
                else:
                    log.info("intake resumed")
                    await self.health.set(INTAKE_HEALTH, serving.SERVING)
                self.paused_reason = reason
                metrics.intake_paused.set(1 if reason else 0)
            metrics.spool_depth.set(self.batcher.depth)
            oldest = self.batcher.oldest_pending_ms
            metrics.oldest_pending.set(0 if oldest is None else max(0, time.time() - oldest / 1000))
            now = time.monotonic()
            stuck = [
                name
                for name, beat in (
                    ("batcher", self.batcher.last_progress),
                    ("forwarder", self.forwarder.heartbeat()),
                    # Beats while intake turns, idle included (gateway.edge.intakeproc).
                    ("intake", self.mqtt.heartbeat()),
                )
                if now - beat > self._stuck_after
            ]
            if not stuck:
                if self.ready:
                    self.notifier.watchdog()
            else:
                log.error(
                    "%s made no progress for %.0f s; watchdog pings withheld so "
                    "systemd restarts the gateway",
                    " and ".join(stuck),
                    self._stuck_after,
                )
            if now - last_prune >= PRUNE_EVERY_S:
                last_prune = now
                await self._prune()
            if now - last_status >= 5:
                self.notifier.status(self.summary())
                last_status = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), min(interval, 1.0))

    # ---- run ---------------------------------------------------------------

    async def start(self) -> Started:
        cfg = self.cfg
        # Before anything else: a second gateway on this spool stops here (exit 75).
        self._instance_fd = claim_instance(cfg.spool.path)
        metrics.start_time.set(time.time())
        metrics.build_info.labels(__version__, platform.python_version()).set(1)
        for warning in check_certificates(cfg):
            log.warning("%s", warning)
        pin = cfg.hsm.pin.read()
        # An unexpected exception on the spool writer or in a gRPC submit is a bug: logged
        # once, the message in hand recorded (gateway.edge.poison), the gateway stopped (exit 70).
        self.guard = Guard(crash_record(cfg), self._internal_error, "gateway")
        # A thread of this process that dies of an exception (the spool writer, the intake
        # pipe reader) would otherwise leave the rest running without it.
        threading.excepthook = self.guard.thread_hook
        self.spool = Spool(cfg.spool, cfg.gateway_id, write_priority=True)
        self.spool.on_fatal(self.guard.spool_hook)
        await asyncio.to_thread(self.spool.open)
        # After a key rotation (gateway.edge.rotation) the log signs with other keys.
        keys = await asyncio.wrap_future(self.spool.read(rotation.read_state))
        self.signer = Signer(cfg.hsm, pin, rotator.signer_keys(cfg, keys))
        del pin
        signer = self.signer
        metrics.hsm_up.set_function(lambda: 1.0 if signer.state == "ok" else 0.0)
        info = await asyncio.to_thread(self.signer.start)
        log.info(
            "hsm token %s key %s key_id %s", info.token_label, info.key_label, info.key_id.hex()
        )
        self.forwarder = Forwarder(
            cfg.forwarder,
            self.spool,
            cfg.gateway_id,
            witnesses=cfg.log.witnesses if cfg.log is not None else None,
            max_call_bytes=cfg.batch.max_bytes,
        )
        await self.forwarder.resume()
        self.batcher = Batcher(
            cfg.batch,
            self.spool,
            self.signer,
            cfg.gateway_id,
            info.key_id,
            self.forwarder.notify_signed,
            origin=cfg.log_origin,
            default_key=rotation.TokenKey(cfg.hsm.key_label, cfg.hsm.key_id),
        )
        await self.batcher.resume()
        await rotator.take_request(cfg, self.spool, self.signer, self.batcher)
        self.profiles = await asyncio.to_thread(ProfileSet.from_config, cfg)
        log.info("profiles: %s", ", ".join(self.profiles.names()))
        # Receipts to devices: a publish-only connection of this process, for profiles that
        # opt in ([receipts]); it connects only while one does.
        self.receipts = ReceiptPublisher(
            cfg.mqtt, self.spool, lambda: receipt_specs(self.profiles), make_client
        )
        self.forwarder.on_committed(self.receipts.wake)
        batcher = self.batcher
        make_client(cfg.mqtt)  # TLS and password files: fail here, with the config's words
        # MQTT intake runs in a process of its own (gateway.edge.intakeproc), sharing the spool.
        self.mqtt = IntakePool.create(
            cfg,
            cursor=lambda: batcher.cursor,
            depth=lambda: batcher.depth,
            on_commit=self.spool.note_commit,
            on_exit=self._intake_exited,
            window=FLOW_WINDOW_BATCHES * cfg.batch.max_tx,
        )
        intake = self.mqtt
        self.batcher.on_cut(intake.release)
        # gRPC submits are decoded and spooled here; their rejects are published by the
        # intake process, which holds the broker connection.
        api_intake = Intake(
            self.spool,
            self.profiles,
            cfg.mqtt.reject_topic_prefix,
            intake.dead_letter,
            rejects=cfg.rejects,
            guard=self.guard,
            fault=fault_hook(),
        )
        self.api_intake = api_intake

        server = grpc.aio.server(
            options=server_options(cfg),
            interceptors=authz.interceptors(cfg.api),
            maximum_concurrent_rpcs=cfg.api.max_concurrent_rpcs,
        )
        api = GatewayApi(self.spool, api_intake, self.status, lambda: self.paused_reason)
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(api, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        api_port = add_port(server, cfg.api.listen, cfg.api.tls)
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME, INTAKE_HEALTH):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        metrics_port = None
        if cfg.metrics.listen is not None:
            global _box_registered
            if not _box_registered:
                metrics.register_box_collector(cfg.spool.path.parent)
                _box_registered = True
            host, _, port = cfg.metrics.listen.rpartition(":")
            try:
                httpd, _thread = start_http_server(
                    int(port), addr=host.strip("[]"), registry=metrics.REGISTRY
                )
            except OSError as e:
                raise ConfigError(
                    f"metrics.listen {cfg.metrics.listen}: cannot listen: "
                    f"{e.strerror or e}: stop what holds the port or choose another"
                ) from None
            metrics_port = httpd.server_address[1]
        self.mqtt.start()  # on this (the main) thread: see IntakeProcess.start
        await asyncio.to_thread(self.mqtt.wait_started)
        log.info(
            "gateway %s api on port %d, mqtt %s:%d",
            cfg.gateway_id,
            api_port,
            cfg.mqtt.host,
            cfg.mqtt.port,
        )
        return Started(api_port=api_port, metrics_port=metrics_port)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            await self.start()
            assert self.batcher and self.forwarder and self.mqtt and self.receipts
            batch_stop = asyncio.Event()
            fwd_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                batching = tg.create_task(self.batcher.run(batch_stop), name="batcher")
                tg.create_task(self.forwarder.run(fwd_stop), name="forwarder")
                # Stops with the forwarder: what it leaves pending goes after the next start.
                tg.create_task(self.receipts.run(fwd_stop), name="receipts")
                tg.create_task(self._monitor(), name="monitor")
                tg.create_task(self._announce_ready(), name="ready")
                await self.stop_event.wait()
                await self._drain(batching, batch_stop, fwd_stop)
        finally:
            await self._close()
        return self.exit_code

    def _intake_exited(self, code: int, message: str) -> None:
        """The intake process died (it is never expected to): stop, so systemd restarts
        the gateway; the broker keeps what was not acknowledged."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail, code, message)

    def _internal_error(self, message: str) -> None:
        """The guard's stop (any thread): the one stop path, with exit 70; a backstop
        ends the process if that stop hangs."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: already stopping
                self._loop.call_soon_threadsafe(self._fail, EXIT_SOFTWARE, message)
        exit_after(FATAL_EXIT_AFTER_S)

    def _fail(self, code: int, message: str) -> None:
        log.error("%s; stopping so the service restarts", message)
        self.exit_code = code
        self.request_stop()

    async def _announce_ready(self) -> None:
        assert self.mqtt is not None
        while not self.stop_event.is_set():
            if self.mqtt.subscribed.is_set():
                self.notifier.ready(self.summary())
                self.ready = True
                log.info("ready")
                return
            await asyncio.sleep(0.05)

    def _reload(self) -> None:
        """SIGHUP: reload firmware profiles; a broken file keeps the running set."""
        self.notifier.reloading()
        if self.profiles is not None:
            self.profiles.try_reload(log)  # the set gRPC submits are decoded with
        if self.mqtt is not None:
            self.mqtt.reload()  # the intake process reloads and resubscribes
        if self.spool is not None and self.signer is not None and self.batcher is not None:
            # A key rotation `edge-gateway hsm rotate` asked for.
            task = asyncio.ensure_future(
                rotator.take_request(self.cfg, self.spool, self.signer, self.batcher)
            )
            self._rotations.add(task)
            task.add_done_callback(self._rotations.discard)
        log.info("reload done; other configuration changes take effect on restart")
        self.notifier.ready(self.summary())

    async def _drain(
        self, batching: asyncio.Task[None], batch_stop: asyncio.Event, fwd_stop: asyncio.Event
    ) -> None:
        """Graceful stop: no new intake, flush, sign the open batch, forward, stop."""
        assert self.mqtt and self.spool and self.batcher and self.forwarder
        self.notifier.stopping("draining")
        log.info("stopping: intake closed, signing the open batch and forwarding")
        t0 = time.monotonic()
        await asyncio.to_thread(self.mqtt.stop)
        if self.api_intake is not None:
            self.api_intake.flush_summaries(force=True)
        await asyncio.wrap_future(self.spool.write(lambda _c: None))  # group commit flushed
        batch_stop.set()
        await batching  # a cut under way finishes before the open batch is cut
        made = await self.batcher.flush()
        while not self.forwarder.all_delivered() and time.monotonic() - t0 < DRAIN_TIMEOUT_S:
            await asyncio.sleep(0.05)
        fwd_stop.set()
        log.info(
            "stopped: %d final batch(es), last signed %d, last committed %d%s",
            made,
            self.batcher.next_seq - 1,
            self.forwarder.last_committed_seq,
            ""
            if self.forwarder.all_delivered()
            else " (the rest is forwarded after the next start)",
        )

    async def _close(self) -> None:
        if self._server is not None:
            await self._server.stop(1.0)
        if self.mqtt is not None:
            await asyncio.to_thread(self.mqtt.stop)
        if self.signer is not None:
            await asyncio.to_thread(self.signer.close)
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)
        if self._instance_fd is not None:
            os.close(self._instance_fd)  # the last thing: the spool is closed
            self._instance_fd = None


def run(cfg: GatewayConfig) -> int:
    return asyncio.run(Gateway(cfg).run())
