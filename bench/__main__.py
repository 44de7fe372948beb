"""Run the benchmarks ``bench/run`` asks for, print their tables, and fail on a missed target."""

import sys

from bench import balancer, deploy, scale, service
from bench.common import LATEST, BenchError, Target

SUITES = {"service": service, "balancer": balancer, "deploy": deploy, "scale": scale}
USAGE = (
    "usage: bench/run [service|balancer|deploy|scale] [FLAGS of that one; bench/run service --help]"
)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] in SUITES:
        names, flags = [argv[0]], argv[1:]
    elif not argv or argv[0] == "all":
        names, flags = list(SUITES), []
    else:
        print(USAGE, file=sys.stderr)
        return 2
    checked: list[Target] = []
    failed: list[str] = []
    for name in names:
        suite = SUITES[name]
        try:
            text, found = suite.run(suite.parse_args(flags))
        except BenchError as err:
            print(f"{name} benchmark failed: {err}", file=sys.stderr)
            failed.append(name)
            continue
        print(text + "\n", flush=True)
        checked += found
    print("## Targets (issues 6, 12 and 23)\n")
    print("\n".join(t.line() for t in checked))
    missed = [t.name for t in checked if not t.ok]
    print(f"\nJSON: {LATEST}")
    if failed or missed:
        print(f"bench: FAILED: {', '.join(failed + missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
