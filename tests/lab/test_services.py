"""The lab's servers on the bridge: apt proxy (Debian only), git mirror, wheelhouse; and the
emulated AWS whose aws_ec2 inventory lists the stack's instances at the lab hosts' addresses."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

# Fetch a URL from a host with the standard library only (the image has no curl), optionally
# through the apt proxy; prints the HTTP status and the first bytes of the body.
FETCH = """python3 - <<'EOF'
import urllib.request, urllib.error
proxy = {proxy!r}
handler = urllib.request.ProxyHandler({{"http": proxy}} if proxy else {{}})
opener = urllib.request.build_opener(handler)
try:
    with opener.open({url!r}, timeout=20) as r:
        print(r.status, r.read(400).decode("latin-1"))
except urllib.error.HTTPError as e:
    print(e.code)
EOF"""


def fetch(lab: LabSession, url: str, proxy: str = "") -> str:
    return lab.ssh(lab.hosts[0], FETCH.format(url=url, proxy=proxy)).stdout


def test_hosts_use_the_apt_proxy_which_serves_the_debian_archive(lab: LabSession) -> None:
    proxy = lab.env["LAB_APT_PROXY"]
    config = lab.ssh(lab.hosts[0], "apt-config dump Acquire::http::Proxy").stdout
    assert proxy in config
    release = fetch(lab, "http://deb.debian.org/debian/dists/bookworm/Release", proxy)
    assert release.startswith("200 ")
    assert "Codename: bookworm" in release


def test_the_apt_proxy_answers_concurrent_release_requests_whole(lab: LabSession) -> None:
    """Hosts refresh their package lists at the same moment in every deploy. apt-cacher-ng, left
    to treat release files as volatile, answers some of 12 such requests with headers and no body
    (issue 15: two in a row hang apt). Three rounds of 12, as apt asks: every body whole."""
    proxy = urllib.parse.urlsplit(lab.env["LAB_APT_PROXY"])
    urls = [
        "http://deb.debian.org/debian/dists/bookworm/InRelease",
        "http://deb.debian.org/debian-security/dists/bookworm-security/InRelease",
    ]
    start = threading.Barrier(12)

    def fetch_whole(url: str) -> int:
        start.wait(timeout=30)
        conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=30)
        try:
            conn.request("GET", url, headers={"Cache-Control": "max-age=0"})
            response = conn.getresponse()
            assert response.status == 200, (url, response.status)
            return len(response.read())  # IncompleteRead when the body is cut short
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=12) as pool:
        for _ in range(3):
            sizes = list(pool.map(fetch_whole, urls * 6))
            assert len(sizes) == 12 and min(sizes) > 1000, sizes


def test_the_apt_proxy_refuses_anything_but_the_debian_archive(lab: LabSession) -> None:
    # .invalid never resolves; the proxy must refuse by its own rules before trying.
    assert fetch(lab, "http://example.invalid/", lab.env["LAB_APT_PROXY"]).startswith("403")


def test_hosts_clone_the_project_from_the_lab_git_server(lab: LabSession) -> None:
    head = json.loads((lab.state / "lab.json").read_text())["commit"]  # HEAD when the lab came up
    subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{head}^{{commit}}"], check=True)
    url = f"git://{lab.bridge_address}/greeter.git"
    remote = lab.ssh(lab.hosts[0], f"git ls-remote {url} refs/heads/main").stdout.split()
    assert remote == [head, "refs/heads/main"]
    clone = lab.ssh(
        lab.hosts[1 % len(lab.hosts)],
        f"rm -rf /tmp/clone && git clone -q {url} /tmp/clone && git -C /tmp/clone rev-parse HEAD",
    )
    assert clone.stdout.strip() == head


def test_tests_can_push_other_commits_into_the_lab_git_mirror(lab: LabSession) -> None:
    mirror = lab.git_mirror
    subprocess.run(
        ["git", "-C", str(REPO), "push", "--quiet", str(mirror), "HEAD:refs/heads/test-push"],
        check=True,
    )
    url = f"git://{lab.bridge_address}/greeter.git"
    assert "refs/heads/test-push" in lab.ssh(lab.hosts[0], f"git ls-remote {url}").stdout


def test_hosts_install_wheels_from_the_lab_wheelhouse(lab: LabSession) -> None:
    pip_conf = lab.ssh(lab.hosts[0], "cat /etc/pip.conf").stdout
    wheelhouse = lab.env["LAB_WHEELHOUSE_URL"]
    assert f"find-links = {wheelhouse}" in pip_conf
    assert "no-index = true" in pip_conf
    index = lab.ssh(
        lab.hosts[0],
        "python3 -c 'import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())' " + wheelhouse,
    ).stdout
    requirements = (REPO / "service" / "requirements.txt").read_text().splitlines()
    pins = [line.split("==") for line in requirements if "==" in line]
    assert pins
    for name, version in pins:
        assert f"{name.replace('-', '_')}-{version}-" in index, (name, version)


def test_aws_ec2_inventory_lists_the_stack_instances_at_lab_addresses(
    lab_stack: LabSession,
) -> None:
    lab = lab_stack
    graph = lab.run("ansible-inventory", "--graph", "greeter_servers").stdout
    names = sorted(line.strip(" |-") for line in graph.splitlines()[1:])
    assert names == sorted(h.name for h in lab.hosts)
    for host in lab.hosts:
        hostvars = yaml.safe_load(
            lab.run("ansible-inventory", "--host", host.name, "--yaml").stdout
        )
        assert str(hostvars["ansible_host"]) == host.address
        # moto's public IP is in the inventory, and never used to connect
        assert str(hostvars["ec2_public_ip_address"]) != host.address
        assert hostvars["ec2_tags"]["Name"] == host.name
        assert hostvars["ec2_tags"]["aws:cloudformation:stack-name"] == "greeter"
    ping = lab.run("ansible", "greeter_servers", "-m", "ansible.builtin.ping")
    assert ping.stdout.count("SUCCESS") == len(lab.hosts)
    # A lab up without --balancer runs a stack without the balancer instance
    # (tests/frontdoor brings one up with it).
    assert lab.balancer is None
    inventory = json.loads(lab.run("ansible-inventory", "--list").stdout)
    assert inventory.get("greeter_lb", {}).get("hosts", []) == []
