"""A rendezvous for ranks on one machine that listens on 127.0.0.1 only.

torch's c10d rendezvous creates its ``TCPStore`` servers (the rendezvous store, and the store it
shares with the workers) with ``TCPStore(host, port)``, which listens on every interface whatever
``host`` says (measured on torch 2.13: ``*:PORT``). The ``usp-loopback`` rendezvous backend hands
both a socket already bound to 127.0.0.1 (``TCPStore(master_listen_fd=...)``). ``usp train`` and
``usp generate`` launch their ranks on it.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"
RENDEZVOUS_BACKEND = "usp-loopback"


def _loopback_store(**kwargs):
    """A TCPStore server listening on 127.0.0.1 only (a free port)."""
    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen()
    port = listener.getsockname()[1]
    # detach: the store serves on this descriptor from now on, Python must not close it
    return TCPStore(LOOPBACK, port, is_master=True, multi_tenant=True,
                    master_listen_fd=listener.detach(), **kwargs)


def _create_loopback_handler(params):
    from datetime import timedelta

    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    class LoopbackBackend(C10dRendezvousBackend):
        """torch's c10d rendezvous state on our store, under the name it was registered with."""

        @property
        def name(self) -> str:
            return RENDEZVOUS_BACKEND

    store = _loopback_store(timeout=timedelta(seconds=params.get_as_int("read_timeout", 60)))
    handler = create_handler(store, LoopbackBackend(store, params.run_id), params)
    # The store torch shares with the workers is made by this (private) method, with
    # TCPStore(host, 0), listening on all interfaces; tests/test_faults.py checks the result.
    handler._create_tcp_store_server = lambda master_addr, master_port: _loopback_store()
    return handler


def register_loopback_rendezvous() -> None:
    """Make ``RENDEZVOUS_BACKEND`` known to torch's elastic launcher (idempotent)."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RENDEZVOUS_BACKEND, _create_loopback_handler)
