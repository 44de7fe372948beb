"""``greeter probe --publish-stack``: what the probe measured, as CloudWatch metrics.

Namespace ``Greeter``: ``HealthyHosts`` (targets that passed every check; dimension ``Stack``)
feeds the stack's healthy-hosts alarm (playbooks/alarms.yml), and ``ProbeLatency`` (the
SayHello round trip in milliseconds; dimensions ``Stack`` and ``Host``) shows a slow host.
boto3 finds credentials, region and endpoint the standard way (AWS_* variables, profiles);
it is a controller requirement only, so it is imported here and not by the server.
"""

from collections.abc import Sequence

from greeter.probe import ProbeResult

NAMESPACE = "Greeter"


def metric_data(results: Sequence[ProbeResult], stack: str) -> list[dict]:
    """One HealthyHosts datum for the fleet and one ProbeLatency datum per host that answered."""
    data = [
        {
            "MetricName": "HealthyHosts",
            "Dimensions": [{"Name": "Stack", "Value": stack}],
            "Value": float(sum(result.ok for result in results)),
            "Unit": "Count",
        }
    ]
    for result in results:
        if result.latency_ms is None:
            continue
        data.append(
            {
                "MetricName": "ProbeLatency",
                # The host's own name (the inventory's), not the address it was reached at.
                "Dimensions": [
                    {"Name": "Stack", "Value": stack},
                    {"Name": "Host", "Value": result.hostname or result.target},
                ],
                "Value": result.latency_ms,
                "Unit": "Milliseconds",
            }
        )
    return data


def publish(results: Sequence[ProbeResult], stack: str, region: str | None = None) -> None:
    """Send the probe's measurements in one PutMetricData call (up to 1000 data per call)."""
    import boto3  # noqa: PLC0415 -- a controller-only dependency, and 0.3 s to import

    client = boto3.client("cloudwatch", region_name=region)
    client.put_metric_data(Namespace=NAMESPACE, MetricData=metric_data(results, stack))
