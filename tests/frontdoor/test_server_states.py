"""greeter_lb_server's saved server states (what a reload hands to the new HAProxy process),
without a lab: only servers whose address and port the new configuration keeps are carried over,
since HAProxy would apply a saved port over a changed one (haproxy/haproxy#1412)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "roles" / "greeter_lb" / "library" / "greeter_lb_server.py"
spec = importlib.util.spec_from_file_location("greeter_lb_server", MODULE)
server = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = server
spec.loader.exec_module(server)

HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)
SAVED = "\n".join(
    [
        "1",
        HEADER,
        "3 greeter 1 greeter-1 10.0.0.11 2 0 1 1 506 15 3 2 6 0 0 0 - 50051 - 0 0 - - 0",
        "3 greeter 2 greeter-2 10.0.0.12 2 8 1 1 110 15 3 2 6 0 0 0 - 50051 - 0 0 - - 0",
        "3 greeter 3 greeter-3 10.0.0.13 2 8 1 1 84 15 3 2 6 0 0 0 - 50051 - 0 0 - - 0",
    ]
)
CONFIG = """global
    maxconn 8000
frontend grpc
    default_backend greeter
backend greeter
    balance roundrobin
    server greeter-1 10.0.0.11:50051
    server greeter-2 10.0.0.12:50052
"""


def test_only_servers_whose_address_and_port_stay_are_carried_over(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    wanted = server.wanted_servers(str(config), "greeter")
    assert wanted == {"greeter-1": "10.0.0.11:50051", "greeter-2": "10.0.0.12:50052"}
    kept = server.keep_matching(SAVED, wanted).splitlines()
    # greeter-2's port changed and greeter-3 left the configuration: both start afresh.
    assert kept[:2] == ["1", HEADER]
    assert [line.split()[3] for line in kept[2:]] == ["greeter-1"]
