"""A TCP proxy that adds a fixed one-way delay to every chunk of data in each direction: with 10 ms each
way, every request/response turn costs a 20 ms round trip, while a stream keeps its bandwidth (chunks
in flight are not waited for one by one).

Usage: python3 bench/delayproxy.py --listen 127.0.0.1:PORT --upstream HOST:PORT|unix:PATH [--one-way-ms 10]

Each accepted connection opens one upstream connection.  Data read from one side is held until
`one-way-ms` after it arrived, then written to the other side, in order; an end of stream is passed on
the same way.  The first client chunk of a connection is held one round trip longer, for the TCP
handshake that a far client pays and a loopback connect does not.  Bandwidth is not limited here (the
benchmark limits it with `tc qdisc ... tbf` on the namespace's loopback).  Prints `ready` on stdout once
it listens.

What belongs here: the proxy and its command line (it runs as a script, standalone, inside the network
namespace of bench/regimes.py).  What never does: anything of lazymount or of the bench package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

CHUNK = 256 * 1024
QUEUED_CHUNKS = 256  # per direction: up to 64 MiB held, far above 1 Gbit/s x 10 ms


async def _open_upstream(upstream: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if upstream.startswith("unix:"):
        return await asyncio.open_unix_connection(upstream.removeprefix("unix:"))
    host, port = upstream.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, delay: float,
                not_before: float = 0.0) -> None:
    """Copy `source` to `sink`, each chunk written `delay` seconds after it was read (and not before the
    loop time `not_before`); then pass on the end of stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)

    async def send() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            await asyncio.sleep(due - loop.time())
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()

    sender = asyncio.create_task(send())
    try:
        while data := await source.read(CHUNK):
            await queue.put((max(loop.time() + delay, not_before), data))
        await queue.put(None)
        await sender
    finally:
        sender.cancel()


async def _serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, upstream: str,
                 delay: float) -> None:
    accepted = asyncio.get_running_loop().time()
    try:
        server_reader, server_writer = await _open_upstream(upstream)
    except OSError:
        client_writer.close()
        return
    pumps = [asyncio.create_task(_pump(client_reader, server_writer, delay, accepted + 3 * delay)),
             asyncio.create_task(_pump(server_reader, client_writer, delay))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)  # a reset ends both directions
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in (client_writer, server_writer):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def serve(listen: str, upstream: str, delay: float) -> None:
    """Proxy connections to `listen` (HOST:PORT) to `upstream` (HOST:PORT or unix:PATH) until cancelled."""
    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(lambda r, w: _serve(r, w, upstream, delay), host, int(port))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT|unix:PATH")
    parser.add_argument("--one-way-ms", type=float, default=10.0, help="delay each way (default 10)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.upstream, args.one_way_ms / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
