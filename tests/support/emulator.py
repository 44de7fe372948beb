"""A boto3 client of the AWS emulator (moto's server), the one way tests reach it directly."""

from __future__ import annotations

from typing import Any

import boto3


def client(endpoint: str, service: str, region: str) -> Any:
    """A boto3 client of the emulator at `endpoint`, with moto's dummy credentials."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
    )
