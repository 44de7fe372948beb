"""The handler pool grows only while its threads are stuck, and shrinks back."""

import threading
import time

from greeter.pool import ElasticThreadPool


def test_stuck_threads_get_help_and_the_extra_threads_leave():
    pool = ElasticThreadPool(2, stall_after=0.05, idle_exit=0.5)
    release = threading.Event()
    stuck = [pool.submit(release.wait, 30) for _ in range(5)]
    started = time.monotonic()
    assert pool.submit(lambda: "served").result(timeout=5) == "served"
    assert time.monotonic() - started < 3
    assert pool.threads > 2
    release.set()
    assert all(future.result(timeout=5) for future in stuck)
    deadline = time.monotonic() + 10
    while pool.threads > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.threads == 2
    pool.shutdown()


def test_busy_threads_do_not_grow_the_pool():
    pool = ElasticThreadPool(1, stall_after=0.5)
    results = [pool.submit(sum, range(1000)) for _ in range(5000)]
    assert [future.result(timeout=30) for future in results] == [499500] * 5000
    assert pool.threads == 1
    pool.shutdown()


def test_errors_reach_the_caller():
    pool = ElasticThreadPool(1)
    future = pool.submit(int, "not a number")
    assert isinstance(future.exception(timeout=5), ValueError)
    pool.shutdown()
