"""lab/emulator.py: loopback only, Canonical's image parameters everywhere, a clean stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from aws_helpers import REPO, emulator_client, start_emulator, stop_emulator

pytestmark = pytest.mark.aws

UBUNTU_22_04 = "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id"
UBUNTU_24_04 = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "localhost"])
def test_the_emulator_refuses_anything_but_a_loopback_address(host: str) -> None:
    result = subprocess.run(
        [sys.executable, REPO / "lab" / "emulator.py", "--port", "0", "--host", host],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "--host" in result.stderr


def test_the_emulator_serves_ubuntu_images_in_every_region_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    ready_file = tmp_path / "ready"
    process, endpoint = start_emulator(ready_file)
    try:
        assert endpoint.startswith("http://127.0.0.1:")
        for region in ("us-east-1", "eu-central-1", "ap-southeast-2"):
            client = emulator_client(endpoint, "ssm", region)
            images = {
                name: client.get_parameter(Name=name)["Parameter"]["Value"]
                for name in (UBUNTU_22_04, UBUNTU_24_04)
            }
            ec2 = emulator_client(endpoint, "ec2", region)
            known = ec2.describe_images(ImageIds=list(images.values()))["Images"]
            assert {image["OwnerId"] for image in known} == {"099720109477"}  # Canonical
            assert len(known) == 2
    finally:
        returncode = stop_emulator(process)
    assert returncode == 0
    assert not ready_file.exists()
