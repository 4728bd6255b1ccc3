"""Load generator for benches/stream_throughput.sh (needs `pip install nats-py`).

  nats_load.py publish URL STREAM SUBJECT_PREFIX SAMPLES BATCH   fill the input stream
  nats_load.py drain URL RESULTS_STREAM SAMPLES          wait for every verdict, print samples/s

`publish` creates STREAM on SUBJECT_PREFIX.> if missing, writes SAMPLES samples as messages of BATCH samples each on SUBJECT_PREFIX.host-NN
(100 hosts) with core NATS, then checks that the input stream stored them all. `drain` times
the results stream from its first verdict to the last, so replica start-up is not counted.
"""

import asyncio
import json
import sys
import time

import nats


def sample(i):
    # Values inside the sample data's normal range, varied so no two samples are equal.
    return {
        "id": i,
        "cpu_usage": 20.0 + (i % 40),
        "mem_usage": 40.0 + (i % 17) * 0.5,
        "disk_busy": 5.0 + (i % 11),
        "net_in_bps": 1.5e6 + (i % 29) * 1.0e4,
    }


async def publish(url, stream, prefix, samples, batch):
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
    messages = 0
    for start in range(0, samples, batch):
        ids = range(start, min(start + batch, samples))
        body = sample(start) if batch == 1 else {"samples": [sample(i) for i in ids]}
        await nc.publish(f"{prefix}.host-{messages % 100:02d}", json.dumps(body).encode())
        messages += 1
        if messages % 5000 == 0:
            await nc.flush()
    await nc.flush()
    for _ in range(200):
        info = await js.stream_info(stream)
        if info.state.messages >= messages:
            break
        await asyncio.sleep(0.05)
    else:
        raise SystemExit(f"stream {stream} holds {info.state.messages} of {messages} messages")
    print(f"published {samples} samples in {messages} messages", file=sys.stderr)
    await nc.close()


async def drain(url, results_stream, samples):
    nc = await nats.connect(url)
    js = nc.jetstream()
    first = None
    deadline = time.monotonic() + 600
    while True:
        try:
            stored = (await js.stream_info(results_stream)).state.messages
        except nats.js.errors.NotFoundError:
            stored = 0
        now = time.monotonic()
        if stored and first is None:
            first = (now, stored)
        if stored >= samples:
            break
        if now > deadline:
            raise SystemExit(f"only {stored} of {samples} verdicts after 600 s")
        await asyncio.sleep(0.02)
    seconds = now - first[0]
    rate = (samples - first[1]) / seconds if seconds > 0 else float("inf")
    print(f"{rate:.0f}")
    await nc.close()


if __name__ == "__main__":
    command, url = sys.argv[1], sys.argv[2]
    if command == "publish":
        asyncio.run(publish(url, sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])))
    elif command == "drain":
        asyncio.run(drain(url, sys.argv[3], int(sys.argv[4])))
    else:
        raise SystemExit(__doc__)
