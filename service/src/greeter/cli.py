"""``greeter``: talk to Greeter servers — ``hello``, ``probe`` and ``bench``.

Exit codes (every subcommand):

* 0 — success (bench: every call returned OK)
* 2 — usage: bad flags, target or unreadable TLS file
* 3 — cannot connect: UNAVAILABLE, or the deadline passed before a connection was made;
  probe: no target could be reached at all; bench: no connection became ready
* 4 — an RPC failed or a check did not pass: probe: some target was reached but is not
  SERVING, answered wrongly, or runs another commit than --expect-commit; bench: some calls
  failed (the report's status codes say which)
* 5 — probe --publish-stack: the measurements could not be published to CloudWatch
"""

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence

import grpc

from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from greeter import probe
from greeter.client import (
    EXIT_CONNECT,
    EXIT_OK,
    EXIT_RPC,
    EXIT_USAGE,
    Target,
    Tls,
    UsageError,
    open_channel,
)

EXIT_PUBLISH = 5

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str) -> float:
    """``10s``, ``500ms``, ``2m`` or plain seconds, as seconds."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 10s, 500ms or 2m, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def warmup(text: str) -> tuple[int, float]:
    """A warm-up as a call count (``500``) or a duration (``2s``)."""
    if text.strip().isdigit():
        return int(text), 0.0
    return 0, duration(text)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def rate(text: str) -> float:
    """Calls per second: a positive number."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected calls per second above 0, got {text!r}")
    return value


def target(text: str) -> Target:
    try:
        return Target.parse(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    tls = argparse.ArgumentParser(add_help=False)
    group = tls.add_argument_group("TLS (plaintext when none is given)")
    group.add_argument("--ca", metavar="FILE", help="PEM CA bundle that signed the server's cert")
    group.add_argument("--cert", metavar="FILE", help="PEM client certificate (mutual TLS)")
    group.add_argument("--key", metavar="FILE", help="PEM client key (mutual TLS)")
    group.add_argument("--server-name", metavar="NAME", help="name to verify the server cert for")

    parser = argparse.ArgumentParser(
        prog="greeter",
        description="Talk to Greeter servers. TARGET is host[:port], port 50051 by default.",
        epilog="Exit codes: 0 ok, 2 usage, 3 cannot connect, 4 RPC error or failed check.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    hello = commands.add_parser("hello", parents=[tls], help="say hello once: prints Olá, NAME!")
    hello.add_argument("target", type=target, metavar="TARGET")
    hello.add_argument("name", metavar="NAME")
    hello.add_argument("--deadline", type=duration, default=5.0, help="seconds (default 5)")

    check = commands.add_parser(
        "probe", parents=[tls], help="check health, greeting, latency and version of each target"
    )
    check.add_argument("targets", type=target, nargs="+", metavar="TARGET")
    check.add_argument("--json", action="store_true", help="a JSON list for machines")
    check.add_argument("--deadline", type=duration, default=5.0, help="per call (default 5 s)")
    check.add_argument("--expect-commit", metavar="SHA", help="fail targets running another commit")
    check.add_argument(
        "--publish-stack",
        metavar="STACK",
        help="also send HealthyHosts and ProbeLatency to CloudWatch (namespace Greeter) for STACK",
    )
    check.add_argument(
        "--publish-region", metavar="REGION", help="CloudWatch region (default: AWS's own)"
    )
    check.add_argument(
        "--balancer", type=target, metavar="TARGET", help="the front door: probed first, marked so"
    )
    check.add_argument(
        "--balancer-ca",
        metavar="FILE",
        help="call the front door over TLS, verified with this PEM CA bundle (the TLS options "
        "above are the backends')",
    )
    check.add_argument(
        "--balancer-server-name", metavar="NAME", help="name to verify the front door's cert for"
    )
    check.add_argument(
        "--backend-state",
        type=backend_state,
        action="append",
        default=[],
        metavar="TARGET=STATE",
        help="a target's state at the balancer (UP, DOWN, DRAIN, MAINT); not UP fails its row",
    )

    load = commands.add_parser(
        "bench", parents=[tls], help="load test: keep -c calls in flight, report like ghz"
    )
    load.add_argument("targets", type=target, nargs="+", metavar="TARGET")
    load.add_argument("-c", "--concurrency", type=positive, default=50, help="calls in flight")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("-n", "--total", type=positive, help="calls to make (default 200)")
    amount.add_argument("-z", "--duration", type=duration, help="run for a time, e.g. 30s")
    load.add_argument(
        "--connections", type=positive, default=1, help="TCP connections (per target)"
    )
    load.add_argument("--warmup", type=warmup, default=(0, 0.0), help="calls (N) or time (5s)")
    load.add_argument("--name", default="bench", help="the nome sent (default bench)")
    load.add_argument("--procs", type=positive, default=1, help="client processes (default 1)")
    load.add_argument("--deadline", type=duration, default=20.0, help="per call (default 20 s)")
    load.add_argument(
        "--rate", type=rate, default=0.0, help="calls/s in all, a steady load (default: flat out)"
    )
    load.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def backend_state(text: str) -> tuple[str, str]:
    """TARGET=STATE, the target normalised as probe prints it."""
    where, sep, state = text.rpartition("=")
    if not sep or state.upper() not in ("UP", "DOWN", "DRAIN", "MAINT"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected TARGET=UP|DOWN|DRAIN|MAINT")
    return str(target(where)), state.upper()


def _tls(args: argparse.Namespace) -> Tls:
    return Tls(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)


def cmd_hello(args: argparse.Namespace) -> int:
    with open_channel(str(args.target), _tls(args)) as channel:
        try:
            reply = pb_grpc.GreeterStub(channel).SayHello(
                pb.Mensagem(nome=args.name), timeout=args.deadline
            )
        except grpc.RpcError as error:
            status = EXIT_CONNECT if probe.failed_to_connect(channel, error) else EXIT_RPC
            print(f"greeter: {error.code().name}: {error.details()}", file=sys.stderr)
            return status
    print(reply.texto)
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    if args.balancer_ca and not args.balancer:
        raise UsageError("--balancer-ca needs --balancer")
    if args.balancer_server_name and not args.balancer_ca:
        raise UsageError("--balancer-server-name needs --balancer-ca")
    front_tls = Tls(ca=args.balancer_ca, server_name=args.balancer_server_name)
    front = [(args.balancer, front_tls)] if args.balancer else []
    tls = _tls(args)
    results = probe.probe_all(
        [*front, *((t, tls) for t in args.targets)], args.deadline, args.expect_commit
    )
    if args.balancer or args.backend_state:
        states = dict(args.backend_state)
        results = probe.with_balancer(results[0] if front else None, results[len(front) :], states)
    if args.json:
        print(json.dumps([vars(result) for result in results], indent=2, ensure_ascii=False))
    else:
        print(probe.format_table(results))
    if args.publish_stack:
        from greeter import fleetmetrics  # noqa: PLC0415 -- boto3 only when publishing

        try:
            hosts = [r for r in results if r.balancer != probe.FRONT_DOOR]  # HealthyHosts: hosts
            fleetmetrics.publish(hosts, args.publish_stack, args.publish_region)
        except Exception as error:  # any boto3 failure (credentials, endpoint, API): say it
            print(f"greeter: cannot publish to CloudWatch: {error}", file=sys.stderr)
            return EXIT_PUBLISH
    return probe.exit_code(results)


def cmd_bench(args: argparse.Namespace) -> int:
    from greeter import bench  # noqa: PLC0415 -- asyncio and the load tool: 30 ms a probe never needs

    if args.procs > args.concurrency:
        raise UsageError(f"--procs {args.procs} exceeds -c {args.concurrency}: each needs a call")
    spec = bench.LoadSpec(
        targets=tuple(args.targets),
        tls=_tls(args),
        concurrency=args.concurrency,
        total=None if args.duration else (args.total or 200),
        duration=args.duration,
        connections=args.connections,
        warmup_calls=args.warmup[0],
        warmup_seconds=args.warmup[1],
        name=args.name,
        deadline=args.deadline,
        rate=args.rate,
    )
    spec.tls.credentials()  # unreadable TLS files are a usage error, before any process starts
    try:
        result = bench.run(spec, args.procs)
    except bench.ConnectError as error:
        print(
            f"greeter: cannot connect to {', '.join(map(str, spec.targets))}: {error}",
            file=sys.stderr,
        )
        return EXIT_CONNECT
    summary = bench.report(result, spec, args.procs)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(bench.format_report(summary))
    return EXIT_OK if summary["status_codes"].get("OK", 0) == summary["count"] else EXIT_RPC


COMMANDS = {"hello": cmd_hello, "probe": cmd_probe, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``greeter`` console script."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"greeter: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
