"""How much one long prompt slows the other sessions' verify rounds (issue 15).

The real SmolLM2-135M target in a :class:`VerifierService` over a Mosquitto
started here (a loopback message costs about 0.4 ms beside rounds of about 110 ms:
the broker is not what is measured).  A short session drafts 4 tokens a round,
one draft outstanding, as a device does:

``alone``
    its round trips with nothing else on the verifier;
``beside``
    its round trips while a second device's ``--prompt-tokens``-token prompt is
    being opened (prefilled step by step between rounds), until that session's
    ``opened`` arrives.

Reported: median and p90 round trip in each phase and their ratio (target: about
2x; the verifier before chunked prefill stalled every round for the whole prompt:
51.6 s for 4,096 tokens), the long open's time, and the same prompt's prefill in one
piece on the same engine (what it costs without anyone else).  A phase with an
error reports no figure.  Writes ``bench/results/long_prompt.json``::

    python -m bench.long_prompt [--prompt-tokens 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.metrics import Registry
from middleware.mosquitto import MosquittoProcess
from middleware.protocol import Draft, OpenSession, Topics, Verdict, decode
from middleware.verifier.engine import TargetEngine
from middleware.verifier.service import VerifierConfig, VerifierService

RESULTS = Path(__file__).resolve().parent / "results" / "long_prompt.json"
T = Topics()


class Device:
    def __init__(self, bus: MqttBus, device: str, sid: str, prompt: tuple[int, ...]) -> None:
        self.bus, self.device, self.sid, self.prompt = bus, device, sid, prompt
        self.clen = 0
        self.seq = 0

    def open_msg(self) -> OpenSession:
        return OpenSession(
            session_id=self.sid,
            device_id=self.device,
            epoch=1,
            seq=0,
            tokenizer="bench",
            prompt=self.prompt,
            max_new_tokens=4096,
        )

    async def open(self) -> None:
        await self.bus.publish(T.session(self.device, self.sid, "open"), self.open_msg().encode())

    async def round(self, verdicts: Any) -> float:
        self.seq += 1
        d = Draft(self.sid, 1, self.seq, self.clen, (17, 42, 7, 99))
        t0 = time.perf_counter()
        await self.bus.publish(T.session(self.device, self.sid, "draft"), d.encode())
        while True:
            v = decode((await verdicts.get(600)).payload, expect=Verdict)
            if v.seq == self.seq and v.kind == "accept":
                self.clen = v.committed_len
                return time.perf_counter() - t0
            if v.kind in ("refused", "resync"):
                raise RuntimeError(f"round refused: {v.reason}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from middleware.models.loading import load_causal_lm

    loaded = load_causal_lm("smollm2")
    engine = TargetEngine(loaded.model)
    gen = torch.Generator().manual_seed(0)
    long_prompt = tuple(
        int(t) for t in torch.randint(100, 40_000, (args.prompt_tokens,), generator=gen)
    )
    async with (
        MosquittoProcess() as broker,
        MqttBus(MqttSettings(broker.host, broker.port, client_id="v")) as vbus,
        MqttBus(MqttSettings(broker.host, broker.port, client_id="short")) as sbus,
        MqttBus(MqttSettings(broker.host, broker.port, client_id="long")) as lbus,
    ):
        svc = VerifierService(
            vbus,
            engine,
            tokenizer_fingerprint="bench",
            config=VerifierConfig(batch=_batch(), max_prompt_tokens=args.prompt_tokens),
            registry=Registry(),
        )
        async with (
            asyncio.TaskGroup() as tg,
            sbus.subscribe(T.device_sessions("short", "verdict")) as sv,
            lbus.subscribe(T.device_sessions("long", "verdict")) as lv,
        ):
            task = tg.create_task(svc.run())
            await svc.ready.wait()
            short = Device(sbus, "short", "s", (1, 2, 3, 4, 5, 6, 7, 8))
            await short.open()
            assert decode((await sv.get(60)).payload, expect=Verdict).kind == "opened"
            for _ in range(5):  # warm-up
                await short.round(sv)
            alone = [await short.round(sv) for _ in range(args.rounds)]
            longd = Device(lbus, "long", "l", long_prompt)
            t0 = time.perf_counter()
            await longd.open()
            beside: list[float] = []
            while True:
                beside.append(await short.round(sv))
                try:
                    with_long = await lv.get(0.001)
                except TimeoutError:
                    continue
                if with_long is not None:
                    v = decode(with_long.payload, expect=Verdict)
                    if v.kind != "opened":
                        raise RuntimeError(f"long open answered {v.kind}: {v.reason}")
                    break
            open_s = time.perf_counter() - t0
            task.cancel()
    # the same prefill in one piece, nobody else on the engine
    t0 = time.perf_counter()
    engine.prefill("one-piece", (*long_prompt, 1), args.prompt_tokens)
    one_piece_s = time.perf_counter() - t0
    return {
        "model": "SmolLM2-135M-Instruct float32, CPU",
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "alone_rounds": len(alone),
        "beside_rounds": len(beside),
        "alone_p50_ms": round(statistics.median(alone) * 1e3, 1),
        "alone_p90_ms": round(pct(alone, 0.9) * 1e3, 1),
        "beside_p50_ms": round(statistics.median(beside) * 1e3, 1),
        "beside_p90_ms": round(pct(beside, 0.9) * 1e3, 1),
        "beside_max_ms": round(max(beside) * 1e3, 1),
        "p50_ratio": round(statistics.median(beside) / statistics.median(alone), 2),
        "p90_ratio": round(pct(beside, 0.9) / pct(alone, 0.9), 2),
        "long_open_s": round(open_s, 1),
        "one_piece_prefill_s": round(one_piece_s, 1),
    }


def _batch() -> Any:
    from middleware.verifier.batcher import BatchConfig

    return BatchConfig(policy="adaptive")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = asyncio.run(run(args))
    print(json.dumps(out, indent=2))
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
