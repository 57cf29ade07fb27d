"""koclip.prefetch.prefetched: results in order, computed ahead, errors where taken, stops cleanly."""

import threading
import time

import pytest

from koclip.prefetch import prefetched


def test_results_come_in_order_whatever_order_the_threads_finish_in():
    def slow_first(i):
        time.sleep(0.05 if i == 0 else 0)
        return i * i

    assert list(prefetched(slow_first, range(10), workers=3, ahead=4)) == [i * i for i in range(10)]


def test_work_runs_ahead_of_the_consumer_but_no_further_than_asked():
    started = []
    lock = threading.Lock()

    def record(i):
        with lock:
            started.append(i)
        return i

    it = prefetched(record, range(100), workers=2, ahead=3)
    assert next(it) == 0
    time.sleep(0.1)  # give the pool time to run whatever it was given
    with lock:
        # 3 submitted before the first result was taken, 1 more after it: never more.
        assert 0 in started and set(started) <= {0, 1, 2, 3}
    it.close()


def test_an_error_is_raised_where_its_result_is_taken():
    def fail_on_2(i):
        if i == 2:
            raise ValueError("bad item 2")
        return i

    it = prefetched(fail_on_2, range(5), workers=2, ahead=2)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad item 2"):
        next(it)


def test_closing_early_cancels_what_has_not_started_and_joins_the_threads():
    calls = []
    it = prefetched(lambda i: calls.append(i) or i, range(1000), workers=1, ahead=2)
    next(it)
    it.close()
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n <= 4
    assert not [t for t in threading.enumerate() if t.name.startswith("koclip-prefetch")]
