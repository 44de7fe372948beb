"""A plain gRPC client, as most users write one: ONE channel, retries disabled, no health checks.

    python plain_client.py TARGET THREADS            # SayHello in a loop until SIGTERM
    python plain_client.py TARGET THREADS --calls N  # N GetVersion calls, then stop
    python plain_client.py ... --ca CA.pem           # the same over TLS, trusting that CA
    python plain_client.py ... --rate R              # at most R calls/s in all (steady traffic)

Each thread keeps one call in flight on the shared channel (with --rate, one call every
THREADS/R seconds: a steady client, which leaves the machine's cores to the deploy it watches).
Prints one JSON object: calls that succeeded, the failed ones ([started, ended, code, details],
wall-clock seconds) and, for GetVersion, how many calls each backend hostname answered.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import threading
import time

import grpc
from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc

DEADLINE = 5.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("threads", type=int)
    parser.add_argument("--calls", type=int, default=0)
    parser.add_argument("--ca", help="call over TLS, trusting this PEM CA (nothing else set)")
    parser.add_argument("--rate", type=float, default=0, help="calls/s in all (0: flat out)")
    args = parser.parse_args()
    options = [("grpc.enable_retries", 0)]
    if args.ca:
        with open(args.ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(ca.read())
        channel = grpc.secure_channel(args.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    stub = pb_grpc.GreeterStub(channel)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()
    ok, failures, answered = [0], [], collections.Counter()
    remaining = [args.calls]

    def one() -> None:
        started = time.time()
        try:
            if args.calls:
                answered[stub.GetVersion(pb.VersionRequest(), timeout=DEADLINE).hostname] += 1
            else:
                reply = stub.SayHello(pb.Mensagem(nome="plain"), timeout=DEADLINE)
                if reply.texto != "Olá, plain!":
                    raise RuntimeError(f"wrong answer {reply.texto!r}")
            with lock:
                ok[0] += 1
        except (grpc.RpcError, RuntimeError) as error:
            code = error.code().name if isinstance(error, grpc.Call) else "WRONG"
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            with lock:
                failures.append([started, time.time(), code, details])

    period = args.threads / args.rate if args.rate else 0.0

    def loop() -> None:
        due = time.monotonic()
        while not stop.is_set():
            if args.calls:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
            one()
            if period:
                due += period
                stop.wait(max(0.0, due - time.monotonic()))

    workers = [threading.Thread(target=loop) for _ in range(args.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    channel.close()
    print(json.dumps({"ok": ok[0], "failures": failures, "answered": dict(answered)}))


if __name__ == "__main__":
    main()
