"""A verifier process for the fault suite: the tiny target, served until SIGTERM (or SIGKILL).

    python -m tests.faults.verifier_proc --host 127.0.0.1 --port 1883 --prefix mw/test \
        --verifier-id v1 [--shared] --ready /tmp/v1.ready

It writes the ``--ready`` file once it has subscribed, so a test knows when
the process can serve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

import torch

from tests.faults.verifiers import InProcessVerifier
from tests.unit.tiny import tiny_llama


async def serve(args: argparse.Namespace) -> None:
    from middleware.verifier.service import VerifierConfig

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    v = InProcessVerifier(
        tiny_llama(seed=0),
        args.host,
        args.port,
        args.prefix,
        args.verifier_id,
        config=VerifierConfig(exclusive=not args.shared),
    )
    async with asyncio.TaskGroup() as tg:
        await v.start(tg)
        await asyncio.to_thread(Path(args.ready).write_text, "ready\n")
        await stop.wait()
        await v.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--verifier-id", required=True)
    p.add_argument("--shared", action="store_true")
    p.add_argument("--ready", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
