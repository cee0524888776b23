"""KV transfer between workers: layout, transfer params, connector halves, transports.

Imports only ``splitserve`` vocabulary (and ``kernels`` for the gather/scatter copies);
never ``splitserve.roles`` or ``splitserve.cluster``. Names below load lazily, so
``import splitserve.kvtransfer`` costs nothing until one is used.

Module map (one box of the design per file):

* ``layout.py``              ``KvLayout``, ``compatibility_hash``, handshake check, checksums
* ``params.py``              versioned msgpack wire formats: ``KvTransferParams`` and messages
* ``lease.py``               ``LeaseManager``: offered blocks held until release/abort/expiry
* ``staging.py``             ``StagingPool``: reusable contiguous buffers blocks travel in
* ``connector_scheduler.py`` scheduler half: every P/D decision of the engine's scheduler
* ``connector_worker.py``    worker half: offer, serve, pull, verify, scatter, report
* ``transport.py``           ``KvTransport`` ABC, ``create_transport``, ``FaultInjector``
* ``ucx_transport.py``       ``UcxTransport`` on ucxx (TCP; shared memory lane; CUDA buffers)
* ``loopback.py``            ``LoopbackTransport`` for in-process tests

A pull, end to end (each worker calls ``get_finished()`` once per engine step)::

    # prefill worker, when the prompt is done
    params = prefill_conn.offer(request_id, block_ids, num_tokens)  # checksums + lease
    send_to_router(params.to_dict())                                 # msgpack-safe dict
    # decode worker
    decode_conn.start_load(request_id, KvTransferParams.decode_any(d), local_block_ids)
    done = decode_conn.get_finished()   # finished_recving / failed_recving
    # prefill worker: its get_finished().finished_sending lists the released lease
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KvLayout": "layout",
    "KvTransferParams": "params",
    "LeaseManager": "lease",
    "LeaseEnd": "lease",
    "LeaseExpiredError": "lease",
    "KvConnectorScheduler": "connector_scheduler",
    "FinishedTransfers": "connector_scheduler",
    "KvConnectorWorker": "connector_worker",
    "TransferConfig": "connector_worker",
    "KvTransport": "transport",
    "FaultInjector": "transport",
    "TransportConnectionError": "transport",
    "create_transport": "transport",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitserve.kvtransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"splitserve.kvtransfer.{module}"), name)
