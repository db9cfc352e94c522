"""The forwarder against real ledger nodes on loopback: what a restart finds decides what
is sent again."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.edge.config import ForwarderConfig, LedgerNodeRef
from gateway.edge.forwarder import Forwarder
from gateway.edge.spool import Spool, StoredBatch
from gateway.formats import batchformat
from gateway.ledger.config import LedgerNodeConfig
from tests.test_ledger import GW, Node, SoftSigner, arun, running
from tests.test_spool import cfg, tx


@contextlib.asynccontextmanager
async def nodes(tmp_path: Path, signer: SoftSigner, n: int) -> AsyncIterator[list[Node]]:
    key = signer.write_public_pem(tmp_path / f"{GW}.pem")
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running(
                    LedgerNodeConfig(
                        node_id=f"ledger-{i + 1}",
                        listen="127.0.0.1:0",
                        db_path=tmp_path / f"ledger-{i + 1}.db",
                        gateway_keys={GW: key},
                        tls=None,
                    )
                )
            )
            for i in range(n)
        ]


def test_batch_the_nodes_hold_without_stored_receipts_is_committed_after_restart(
    tmp_path: Path,
) -> None:
    """The gateway was killed after the nodes stored its last batch and before it stored
    their receipts: after the restart every node's head is past that batch, and it must
    still reach the quorum in the spool."""
    signer = SoftSigner.new(GW)
    spool = Spool(cfg(tmp_path / "spool.db"), GW)
    spool.open()
    try:
        leaves: list[bytes] = []
        for i in range(1, 7):
            item = tx("meter-1", i)
            spool.append(item).result()
            leaves.append(item.leaf)
        batches = []
        prev = batchformat.ZERO_HASH
        for seq, (first, last) in enumerate([(1, 3), (4, 6)]):
            b = signer.batch(seq, prev, leaves[first - 1 : last])
            prev = batchformat.header_hash(b.header)
            batches.append(b)
            stored = StoredBatch(seq, b.header, b.signature, prev, first, last, 3, 0, None)
            spool.write(functools.partial(Spool.w_store_batch, b=stored)).result()

        async def scenario() -> tuple[int, int]:
            async with nodes(tmp_path, signer, 3) as ns:
                for node in ns:
                    for b in batches:
                        receipt = await node.submit(b)
                        if receipt.seq == 0:  # batch 0's receipts reached the spool
                            store = functools.partial(
                                Spool.w_store_receipt,
                                seq=0,
                                node_id=receipt.node_id,
                                receipt=receipt.SerializeToString(),
                                quorum=2,
                            )
                            spool.write(store).result()
                fwd = Forwarder(
                    ForwarderConfig(
                        nodes=tuple(
                            LedgerNodeRef(n.cfg.node_id, f"127.0.0.1:{n.port}") for n in ns
                        ),
                        quorum=2,
                        call_timeout_s=5,
                        backoff_initial_s=0.05,
                        backoff_max_s=0.5,
                        keepalive_s=30,
                        tls=None,
                    ),
                    spool,
                    GW,
                )
                await fwd.resume()
                assert (fwd.last_signed_seq, fwd.last_committed_seq) == (1, 0)
                stop = asyncio.Event()
                task = asyncio.create_task(fwd.run(stop))
                deadline = time.monotonic() + 5
                while fwd.last_committed_seq < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                stop.set()
                await task
                committed = await asyncio.wrap_future(spool.read(Spool.q_last_committed_seq))
                return fwd.last_committed_seq, committed

        assert arun(scenario()) == (1, 1)
        assert len(spool.read(lambda c: Spool.q_receipts(c, 1)).result()) >= 2
    finally:
        spool.close()
