"""Smoke tests of the benchmark harness itself: a few seconds, real servers and a real h2load.

They pin what the benchmark figures rest on: h2load really drives gRPC calls, a gRPC error
that h2load would count as a success is caught, ratios pair rounds, and a missed target fails.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
from greeter import hello_pb2_grpc

from bench import balancer, common, deploy, service

REPO = common.REPO


def test_h2load_drives_real_calls_against_the_baseline_server(tmp_path):
    with service.running(service.baseline_spec(), tmp_path) as server:
        result = service.run_h2load(server.port, 50, duration=1.0)
        assert service.say_hello(server.port, timeout=5) == service.EXPECTED_TEXT
        pids = server.pids()
        assert pids and all(service.rss_mb(pid) > 1 for pid in pids)
    assert result["calls"] > 100
    assert result["calls_per_s"] == pytest.approx(result["calls"] / 1.0)
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert server.proc.returncode == 0, server.tail()


class FailingGreeter(hello_pb2_grpc.GreeterServicer):
    def SayHello(self, request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")


def test_h2load_run_with_grpc_errors_is_rejected_not_counted():
    """Every call answers HTTP 200 with grpc-status 14: h2load says 'succeeded', we must not."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    hello_pb2_grpc.add_GreeterServicer_to_server(FailingGreeter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(common.BenchError, match="returned no message"):
            service.run_h2load(port, 1, duration=0.5)
    finally:
        server.stop(0).wait()


def test_h2load_run_that_finished_no_call_is_retried_not_failed():
    """Connected but nothing finished, nothing failed (a stall on a busy machine): try again."""
    summary = (
        "requests: 500 total, 50 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout\n"
        "traffic: 1KB (1024) total, 1KB (1024) headers (space savings 0%), 0B (0) data\n"
    )
    with pytest.raises(service.NotConnectedError, match="finished none"):
        service.parse_h2load(summary, [], 1.0)
    failed = summary.replace("0 failed", "3 failed")
    with pytest.raises(common.BenchError) as raised:
        service.parse_h2load(failed, [], 1.0)
    assert not isinstance(raised.value, service.NotConnectedError)


def _service_run(calls_per_s: float) -> dict:
    figures = {
        "calls_per_s": calls_per_s, "p99_ms": 1.0, "server_cpu_us_per_call": 100.0,
        "server_cpu_share": 0.9, "disturbed_retries": 0, "rss_mb": [40.0],
    }  # fmt: skip
    return {"h2load": {1: figures}, "greeter_bench": {}, "processes": 1}


def test_the_second_baseline_shows_the_noise_at_1_in_flight():
    rounds = [
        {"baseline": _service_run(b), "candidate": _service_run(c), "control": _service_run(a)}
        for b, c, a in ((100.0, 95.0, 110.0), (100.0, 105.0, 90.0), (100.0, 100.0, 100.0))
    ]
    cfg = service.Config(rounds=3, levels=[1], greeter_bench=False, scaling=False)
    s = service.summarise(rounds, None, cfg)
    assert s["control_vs_baseline_1"]["median"] == 1.0
    assert s["control_vs_baseline_1"]["min"] == 0.9 and s["control_vs_baseline_1"]["max"] == 1.1
    assert "the baseline against a second baseline at 1 in flight: 1.00x (0.90-1.10)" in (
        service.table(s, cfg)
    )


def test_server_that_cannot_start_is_reported_with_its_output(tmp_path):
    spec = service.ServerSpec(
        "broken", ["python3", "-c", "import sys; sys.exit('no port for you')"]
    )
    with pytest.raises(common.BenchError, match="no port for you"):
        service.Server(spec, tmp_path).start(timeout=10)


def test_ratios_pair_rounds_and_summaries_keep_the_range():
    assert common.ratios([110.0, 90.0], [100.0, 100.0]) == [1.1, 0.9]
    with pytest.raises(ValueError, match="rounds"):
        common.ratios([1.0], [1.0, 2.0])
    s = common.summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert common.fmt_range(s) == "2.00x (1.00-3.00)"
    assert common.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_targets_fail_when_missed_or_not_measured():
    assert common.Target("rate", 1.2, ">=", 1.0, "x").ok
    assert not common.Target("rate", 0.9, ">=", 1.0, "x").ok
    assert common.Target("rss", 60.0, "<=", 100.0).ok
    missing = common.Target("rss", None, "<=", 100.0)
    assert not missing.ok and missing.line().startswith("MISS")


def test_play_recap_is_read_per_host():
    stdout = (
        "TASK [x] ***\nok: [greeter-1]\n\nPLAY RECAP *********\n"
        "greeter-1                  : ok=12   changed=0    unreachable=0    failed=0    skipped=3\n"
        "greeter-2                  : ok=12   changed=2    unreachable=0    failed=1    skipped=3\n"
        "localhost                  : ok=3    changed=0    unreachable=0    failed=0    skipped=0\n"
    )
    recap = deploy.parse_recap(stdout)
    assert recap["greeter-2"] == {"ok": 12, "changed": 2, "unreachable": 0, "failed": 1}
    assert set(recap) == {"greeter-1", "greeter-2", "localhost"}


def test_baseline_config_leaves_ansible_at_its_defaults(tmp_path):
    lines = deploy.baseline_cfg(tmp_path).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.startswith("#"))
    for tuned in ("pipelining", "forks", "gathering", "fact_caching"):
        assert tuned not in text
    assert f"roles_path = {REPO}/roles" in text


def test_results_file_keeps_the_other_section(tmp_path):
    path = tmp_path / "latest.json"
    common.write_results("service", {"machine": {"nproc": 2}, "x": 1}, path)
    common.write_results("deploy", {"machine": {"nproc": 2}, "y": 2}, path)
    data = json.loads(path.read_text())
    assert data["service"]["x"] == 1 and data["deploy"]["y"] == 2 and data["machine"]["nproc"] == 2


def test_bench_run_rejects_an_unknown_suite():
    done = subprocess.run(
        [str(REPO / "bench" / "run"), "nonsense"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "usage: bench/run" in done.stderr


def test_rss_sampler_reads_every_process_of_a_tree(tmp_path):
    spec = service.ServerSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"])
    server = service.Server(spec, tmp_path)
    server.proc = subprocess.Popen(spec.command(0))
    try:
        with service.RssSampler(server, every=0.05) as sampler:
            threading.Event().wait(0.3)
        assert list(sampler.peak) == [server.proc.pid]
        assert sampler.peak[server.proc.pid] > 1
    finally:
        server.proc.kill()
        server.proc.wait()


def run_bench(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """``bench/run ARGS`` in its own session; on timeout its whole process group is killed.

    A plain ``subprocess.run`` timeout kills only the Python process and would leave its
    servers and load generators running; the output so far goes into the failure message.
    """
    proc = subprocess.Popen(
        [str(REPO / "bench" / "run"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench/run {' '.join(args)} ran over {timeout:g} s:\n{stdout}\n{stderr}")
    return proc.returncode, stdout, stderr


def test_bench_run_service_prints_the_table_and_writes_json(tmp_path):
    """The whole service pipeline, tiny: both servers, h2load and greeter bench, JSON out.

    Measurements last 2 s, not less: on a busy machine (load 15, another benchmark pinned to
    the same CPUs) a 0.5 s window sometimes ended before the starved server finished a single
    call, and the harness rightly refuses a measurement of no calls.
    """
    args = ["service", "--rounds", "1", "--duration", "2", "--levels", "50", "--no-scaling"]
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path)}
    code, stdout, stderr = run_bench(args, env, timeout=600)
    output = f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    # 1 is also a missed target, which so short a run may show; a harness failure is not.
    assert code in (0, 1), output
    assert "benchmark failed" not in stderr, output
    assert "| 50 (1x50) | h2load |" in stdout, output
    assert "| 50 (1x50) | greeter bench |" in stdout, output
    assert "- metrics on (`--metrics-port`) vs off at 50 in flight (h2load): calls/s" in stdout
    data = json.loads((tmp_path / "latest.json").read_text())
    levels = data["service"]["summary"]["levels"]
    assert levels["50"]["h2load"]["baseline_calls_per_s"]["median"] > 0
    assert levels["50"]["greeter_bench"]["candidate_calls_per_s"]["median"] > 0
    assert data["service"]["summary"]["metrics"]["50"]["on_calls_per_s"]["median"] > 0
    assert data["service"]["rounds"][0]["metrics"]["metrics_handled_ok"] > 0
    names = [t["name"] for t in data["service"]["targets"]]
    assert any("p99 at 50" in name for name in names)
    assert any("metrics on vs off at 50" in name for name in names)
    assert data["machine"]["nproc"] >= 2


def test_play_seconds_come_from_profile_tasks_clock():
    stdout = (
        "PLAY [Provision] ***\n"
        "TASK [a] ***\n"
        "Thursday 26 November 2026  21:34:47 +0000 (0:00:00.204)       0:00:01.000 *****\n"
        "PLAY [Activate] ***\n"
        "TASK [b] ***\n"
        "Thursday 26 November 2026  21:34:50 +0000 (0:00:03.000)       0:00:04.000 *****\n"
        "PLAY [Activate] ***\n"
        "TASK [b] ***\n"
        "Thursday 26 November 2026  21:34:52 +0000 (0:00:02.000)       0:00:06.500 *****\n"
        "PLAY RECAP ***\n"
        "Thursday 26 November 2026  21:34:55 +0000 (0:00:02.500)       0:00:09.000 *****\n"
    )
    plays = deploy.play_seconds(stdout)
    assert plays == [("Provision", 3.0), ("Activate", 2.5), ("Activate", 2.5)]
    line = deploy.plays_line([{"plays": plays}])
    assert line == "Provision 3.0 s; Activate 5.0 s (2 batches)"


def test_deploy_targets_missing_figures_are_misses():
    checked = deploy.targets({}, {}, ("first", "noop3", "noop9"))
    assert checked and not any(t.ok for t in checked)
    first = "first deploy of 3 hosts, besides waiting for their first boot"
    assert {t.name for t in checked} >= {"no-op rerun of 3 hosts", first}


class RecordingRunner:
    """Stands in for deploy.Runner: records which playbook ran under which config."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def play(self, config, scenario, extra=(), playbook=deploy.SITE):
        self.calls.append((scenario, config, playbook))
        return {"seconds": 1.0, "loadavg_1m_before": 2.0, "changed": 0, "plays": []}


def test_noop_rounds_time_deploy_yml_and_site_yml_alternating_which_config_goes_first():
    runner, res = RecordingRunner(), deploy.Results()
    deploy.noop_rounds(runner, deploy.Config(rounds=2), res, 3)
    assert runner.calls == [
        ("noop3", "project", "playbooks/deploy.yml"),
        ("noop3", "baseline", "playbooks/deploy.yml"),
        ("site3", "project", "site.yml"),
        ("site3", "baseline", "site.yml"),
        ("noop3", "baseline", "playbooks/deploy.yml"),
        ("noop3", "project", "playbooks/deploy.yml"),
        ("site3", "baseline", "site.yml"),
        ("site3", "project", "site.yml"),
    ]
    assert {k: len(v["project"]) for k, v in res.runs.items()} == {"noop3": 2, "site3": 2}


def test_noop_rounds_turn_three_configs_when_the_conventional_role_is_deployed():
    runner, res = RecordingRunner(), deploy.Results()
    deploy.noop_rounds(runner, deploy.Config(rounds=3, scenarios=("noop3",)), res, 3, True)
    orders = [[config for _, config, _ in runner.calls[i : i + 3]] for i in (0, 3, 6)]
    assert orders == [
        ["project", "baseline", "conventional"],
        ["baseline", "conventional", "project"],
        ["conventional", "project", "baseline"],
    ]
    assert {c: len(runs) for c, runs in res.runs["noop3"].items()} == {
        "project": 3, "baseline": 3, "conventional": 3
    }  # fmt: skip
    s = deploy.summarise(res.runs)
    assert s["noop3"]["ratio_conventional"]["median"] == 1.0
    text = deploy.table(s, {}, res.runs)
    assert "against a conventional role (bench/conventional/deploy.yml)" in text


def test_deploy_table_shows_load_and_targets_ignore_the_site_yml_rerun_time():
    res = deploy.Results()
    for seconds, load in ((10.0, 4.0), (12.0, 9.0)):
        for scenario in ("noop3", "site3"):
            for config, factor in (("project", 1), ("baseline", 2)):
                run = {"seconds": factor * seconds, "loadavg_1m_before": load, "changed": 0}
                res.record(scenario, config, {**run, "plays": []})
    res.runs["site3"]["project"][0]["seconds"] = 99.0  # a slow site.yml misses no target
    res.extra["drift"] = {"seconds": 5.0, "changed": 2, "repaired": True}
    s = deploy.summarise(res.runs)
    text = deploy.table(s, res.extra, res.runs)
    assert "| no-op rerun, 3 hosts (playbooks/deploy.yml) | 11.0 s (10.0-12.0) |" in text
    assert "| 0.50x (0.50-0.50) | 6.5 (4.0-9.0) |" in text
    assert "whole site.yml (no target)" in text
    checked = {t.name: t for t in deploy.targets(s, res.extra, ("noop3", "site3"))}
    assert checked["no-op rerun of 3 hosts"].value == 11.0
    assert checked["playbooks/deploy.yml rerun repairs a stopped service and an edited unit"].ok
    assert not checked["site.yml rerun repairs a stopped service and an edited unit"].ok


def test_the_first_deploys_wait_for_ready_hosts_comes_from_its_wait_tasks():
    stdout = (
        "TASK [Wait for SSH and Python on the host] ***\n"
        "Friday 04 December 2026  07:00:00 +0000 (0:00:00.204)       0:00:10.000 *****\n"
        "TASK [greeter : Read the host's deployment state] ***\n"
        "Friday 04 December 2026  07:00:04 +0000 (0:00:04.000)       0:00:14.000 *****\n"
        "TASK [greeter : Wait for cloud-init and dpkg's lock] ***\n"
        "Friday 04 December 2026  07:00:05 +0000 (0:00:01.000)       0:00:15.000 *****\n"
        "PLAY RECAP ***\n"
        "Friday 04 December 2026  07:00:50 +0000 (0:00:45.000)       0:01:00.000 *****\n"
    )
    assert deploy.task_seconds(stdout) == [
        ("Wait for SSH and Python on the host", 4.0),
        ("greeter : Read the host's deployment state", 1.0),
        ("greeter : Wait for cloud-init and dpkg's lock", 45.0),
    ]
    assert deploy.ready_seconds(stdout) == 49.0


def test_the_first_deploys_target_leaves_out_the_wait_for_busy_hosts():
    run = {"seconds": 150.0, "ready_wait_seconds": 70.0, "loadavg_1m_before": 1.0, "changed": 9}
    runs = {"first": {"project": [run], "baseline": [], "conventional": []}}
    s = deploy.summarise(runs)
    assert s["first"]["project_ready_wait_seconds"]["median"] == 70.0
    assert s["first"]["project_seconds_besides_ready_wait"]["median"] == 80.0
    (first,) = [t for t in deploy.targets(s, {}, ("first",)) if t.name.startswith("first deploy")]
    assert first.ok
    assert "70.0 s of 150.0 s (47%) waiting" in deploy.table(s, {}, runs)


def _balancer_round(direct_p99: float, through_p99: float, lb_cpu: float) -> dict:
    def run(p99: float, **extra) -> dict:
        return {"calls_per_s": 1000.0, "p50_ms": p99 / 2, "p99_ms": p99, "driver_cpu_share": 0.2,
                "server_cpu_us_per_call": 100.0, "server_cpu_share": 0.9,
                "disturbed_retries": 0, **extra}  # fmt: skip

    through = run(through_p99, balancer_cpu_us_per_call=lb_cpu, balancer_cpu_share=0.3,
                  backend_connections_opened=1)  # fmt: skip
    return {
        "direct": {50: run(direct_p99)},
        "balancer": {50: through},
        "balancer_processes": 2,
        "loadavg_1m_before": 1.0,
    }


def test_balancer_targets_use_the_per_round_p99_difference_and_cpu_ratio():
    cfg = balancer.Config(rounds=3, levels=[50])
    rounds = [_balancer_round(10.0, 10.5, 20.0), _balancer_round(12.0, 14.0, 30.0),
              _balancer_round(8.0, 8.8, 26.0)]  # fmt: skip
    s = balancer.summarise(rounds, cfg)
    assert s["levels"][50]["p99_added_ms"]["median"] == pytest.approx(0.8)
    assert s["levels"][50]["balancer_vs_backend_cpu_per_call"]["median"] == pytest.approx(0.26)
    checked = {t.name: t for t in balancer.targets(s, cfg)}
    assert checked["balancer adds to p99 at 50 in flight (h2load)"].ok
    assert not checked["balancer CPU per call vs a backend's at 50 in flight"].ok
    assert "| 50 (1x50) | 1,000 | 1.00x (1.00-1.00) | 10.0 | 10.5 | 0.8 ms (0.5-2.0) |" in (
        balancer.table(s, cfg)
    )


def test_calls_that_bypass_the_balancer_are_rejected(tmp_path, monkeypatch):
    """HAProxy's own count of answered calls must cover every call h2load saw succeed."""
    cfg = balancer.Config(rounds=1, duration=1.0, levels=[50], log_dir=tmp_path)
    with (
        service.running(service.candidate_spec(), tmp_path) as backend,
        balancer.balancing([backend.port], tmp_path) as lb,
    ):
        through = balancer.measure_path("balancer", 50, backend, lb, cfg)
        assert through["balancer_answered"] >= through["calls"] > 0
        assert through["balancer_cpu_us_per_call"] > 0
        real_h2load = balancer.run_h2load
        monkeypatch.setattr(
            balancer, "run_h2load", lambda port, *args: real_h2load(backend.port, *args)
        )
        with pytest.raises(common.BenchError, match="did not all go through the balancer"):
            balancer.measure_path("balancer", 50, backend, lb, cfg)


def test_bench_run_balancer_prints_the_rows_and_writes_json(tmp_path):
    """The whole balancer pipeline, tiny: the role's haproxy.cfg, a backend, h2load, JSON out."""
    args = ["balancer", "--rounds", "1", "--duration", "2", "--levels", "50"]
    env = {**os.environ, "BENCH_RESULTS": str(tmp_path)}
    code, stdout, stderr = run_bench(args, env, timeout=300)
    output = f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert code in (0, 1), output  # 1 is a missed target; a harness failure is not
    assert "benchmark failed" not in stderr, output
    assert "| 50 (1x50) |" in stdout, output
    data = json.loads((tmp_path / "latest.json").read_text())["balancer"]
    level = data["summary"]["levels"]["50"]
    for key in ("direct_calls_per_s", "balancer_calls_per_s", "direct_p99_ms", "balancer_p99_ms",
                "balancer_cpu_us_per_call", "backend_cpu_us_per_call"):  # fmt: skip
        assert level[key]["median"] > 0, key
    through = data["rounds"][0]["balancer"]["50"]
    assert through["balancer_answered"] >= through["calls"] > 0
    targets = {t["name"]: t for t in data["targets"]}
    p99 = targets["balancer adds to p99 at 50 in flight (h2load)"]
    assert p99["value"] == level["p99_added_ms"]["median"] and p99["limit"] == 1.0
    cpu = targets["balancer CPU per call vs a backend's at 50 in flight"]
    assert cpu["value"] == level["balancer_vs_backend_cpu_per_call"]["median"]
    assert cpu["limit"] == 0.25
    # HAProxy ran the role's own configuration, moved to loopback.
    (config,) = (tmp_path / "logs").glob("haproxy-*.cfg")
    text = config.read_text()
    assert f"bind 127.0.0.1:{config.stem.split('-')[1]} proto h2" in text
    assert "tcp-check send-binary 505249202a20485454502f322e30" in text  # the role's gRPC check
    assert "tcp-check expect binary 00000000020801" in text
    assert "[::]" not in text and "/run/haproxy" not in text
