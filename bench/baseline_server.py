"""The original student design of the Greeter server, kept as the benchmark's baseline.

A sync ``grpc.server`` on ``ThreadPoolExecutor(max_workers=10)`` serving Greeter only: no health,
no reflection, no version RPC, no logging. Every service figure in ``make bench`` is a ratio
against this server measured in the same run, so it must stay exactly this simple.
"""

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc
from greeter import hello_pb2, hello_pb2_grpc


class Greeter(hello_pb2_grpc.GreeterServicer):
    """Answers SayHello the way the student version did."""

    def SayHello(self, request, context):
        return hello_pb2.Resposta(texto=f"Olá, {request.nome}!")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1", help="address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="port (default: %(default)s)")
    args = parser.parse_args(argv)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    hello_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    address = f"{args.bind}:{args.port}"
    if server.add_insecure_port(address) == 0:
        print(f"baseline_server: cannot bind {address}", file=sys.stderr)
        return 3
    server.start()
    print(f"baseline_server: serving on {address}", flush=True)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
