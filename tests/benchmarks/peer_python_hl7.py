"""The benchmark's peer: a plain python-hl7 MLLP server that parses each message and ACKs it.

Written the way python-hl7's documentation shows it (``hl7.mllp.start_hl7_server``
with a ``client_connected_cb`` that reads, ACKs and drains in a loop), minus the
``print`` of every message, so that it measures what a minimal "receive, parse,
ACK" Python listener costs. It does nothing durable: an AA from it means only
"parsed". The bridge's AA means "written to Kafka with acks=all".

Run on the default asyncio event loop, as python-hl7's users run it; ``--uvloop``
runs it on uvloop instead (the bridge's CLI uses uvloop), for a like-for-like
comparison. Prints ``ready mllp=HOST:PORT`` on stdout, runs until SIGTERM/SIGINT::

    python -m tests.benchmarks.peer_python_hl7 --port 0 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import hl7
import hl7.mllp


async def process_hl7_messages(hl7_reader: Any, hl7_writer: Any) -> None:
    """python-hl7's documented connection loop: read a message, ACK it, drain."""
    try:
        while not hl7_writer.is_closing():
            hl7_message = await hl7_reader.readmessage()
            hl7_writer.writemessage(hl7_message.create_ack())
            await hl7_writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        if not hl7_writer.is_closing():
            hl7_writer.close()
            await hl7_writer.wait_closed()


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # encoding: python-hl7 defaults to ASCII; UTF-8 costs the same and does not
    # choke on a sample message with accented names.
    server = await hl7.mllp.start_hl7_server(process_hl7_messages, host, port, encoding="utf-8")
    async with server:
        bound_port = server.sockets[0].getsockname()[1]
        print(f"ready mllp={host}:{bound_port}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2575, help="0 picks a free port")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, not asyncio's loop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.host, args.port))
    else:
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
