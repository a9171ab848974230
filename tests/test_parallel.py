"""parallel.run_in_order and run_streaming: results in order whoever computed them, shared work, failures
reported, helpers gone with their parent."""

from __future__ import annotations

import functools
import os
import signal
import time

import pytest

from chatsft.errors import ChatsftError
from chatsft.parallel import run_in_order, run_streaming


def _square_and_pid(parent: int, k: int) -> tuple[int, bool]:
    time.sleep(0.002 * (k % 5))  # uneven durations, so results arrive out of order
    return k * k, os.getpid() != parent


def _fail_in_helper(parent: int, k: int) -> int:
    if os.getpid() != parent:
        raise ValueError(f"bad task {k}")
    time.sleep(0.05)  # the parent is slow, so a helper takes a task
    return k


def _killed_in_helper(parent: int, k: int) -> int:
    if os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return k


def test_results_come_in_order_and_the_helpers_share_the_work():
    results = list(run_in_order(functools.partial(_square_and_pid, os.getpid()), 40, helpers=2))
    assert [r for r, _ in results] == [k * k for k in range(40)]
    by_helper = sum(helper for _, helper in results)
    assert 0 < by_helper < 40  # both this process and the helpers did some


def test_no_helpers_runs_everything_here():
    results = list(run_in_order(functools.partial(_square_and_pid, os.getpid()), 5, helpers=0))
    assert results == [(k * k, False) for k in range(5)]
    assert list(run_in_order(functools.partial(_square_and_pid, os.getpid()), 0, helpers=3)) == []


def test_an_error_in_a_helper_is_raised_here_with_its_traceback():
    with pytest.raises(ValueError) as err:
        list(run_in_order(functools.partial(_fail_in_helper, os.getpid()), 10, helpers=1))
    assert err.value.args[0].startswith("bad task ")
    (note,) = err.value.__notes__
    assert note.startswith("raised in a preprocessing process, task ") and "_fail_in_helper" in note


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no")


def _fail_unpicklably_in_helper(parent: int, k: int) -> int:
    if os.getpid() != parent:
        raise _Unpicklable("odd")
    time.sleep(0.05)
    return k


def test_an_error_that_cannot_travel_is_a_runtime_error_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)failed on task \d+:.*_Unpicklable: odd"):
        list(run_in_order(functools.partial(_fail_unpicklably_in_helper, os.getpid()), 10, helpers=1))


def test_a_killed_helper_is_a_one_line_error_not_a_hang():
    with pytest.raises(ChatsftError, match=r"died \(exit code -9; -9 is usually the kernel"):
        list(run_in_order(functools.partial(_killed_in_helper, os.getpid()), 10, helpers=1))


def test_stopping_early_stops_the_helpers():
    import multiprocessing

    gen = run_in_order(functools.partial(_square_and_pid, os.getpid()), 1000, helpers=2)
    assert next(gen)[0] == 0
    gen.close()
    assert multiprocessing.active_children() == []


def test_spawn_where_fork_is_missing(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    results = list(run_in_order(functools.partial(_slow_square_and_pid, os.getpid()), 80, helpers=1))
    assert [r for r, _ in results] == [k * k for k in range(80)]
    assert any(helper for _, helper in results)  # the spawned helper (imports first) took a share
    task = functools.partial(_slow_square_and_pid, os.getpid())
    results = list(run_streaming(task, iter(range(80)), helpers=1))
    assert [r for r, _ in results] == [k * k for k in range(80)]
    assert any(helper for _, helper in results)


def _slow_square_and_pid(parent: int, k: int) -> tuple[int, bool]:
    time.sleep(0.05)
    return k * k, os.getpid() != parent


ORPHAN_SCRIPT = """
import functools, multiprocessing, os, sys, time
from chatsft.parallel import run_in_order, run_streaming

def slow(k):
    time.sleep(0.05)
    return k

if __name__ == "__main__":
    results = run_in_order(slow, 10_000, helpers=2)
    next(results)
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" in f.read()  # a zombie has exited; only its parent (now init) has to reap it
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["in_order", "stream"])
def test_helpers_stop_when_their_parent_is_killed(tmp_path, kind):
    import subprocess
    import sys

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), kind], stdout=subprocess.PIPE, text=True)
    helpers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(helpers) == 2
    parent.kill()  # SIGKILL: no finally, no cleanup in the parent
    parent.wait()
    deadline = time.time() + 10
    while not all(map(_gone, helpers)) and time.time() < deadline:
        time.sleep(0.05)
    assert all(map(_gone, helpers))  # within a task (50 ms here), not after the remaining 10,000


def _streamed(items, helpers, **kw):
    return list(run_streaming(functools.partial(_square_and_pid, os.getpid()), iter(items), helpers, **kw))


def test_streaming_results_come_in_order_and_the_helpers_share_the_work():
    results = _streamed(range(60), helpers=2)
    assert [r for r, _ in results] == [k * k for k in range(60)]
    assert 0 < sum(helper for _, helper in results) < 60
    assert _streamed(range(5), helpers=0) == [(k * k, False) for k in range(5)]
    assert _streamed([], helpers=2) == []


def test_streaming_takes_items_only_as_they_can_be_worked_on():
    taken = []

    def items():
        for k in range(200):
            taken.append(k)
            yield k

    gen = run_streaming(functools.partial(_slow_square_and_pid, os.getpid()), items(), helpers=1, ahead=2)
    assert next(gen)[0] == 0
    assert len(taken) <= 2 * 2 + 1  # two per process in flight, and the one yielded
    gen.close()


def _fail_or_die_in_helper(parent: int, how: str, k: int) -> int:
    if os.getpid() != parent:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"bad item {k}")
    time.sleep(0.05)
    return k


def test_streaming_helper_failures_are_raised_here():
    task = functools.partial(_fail_or_die_in_helper, os.getpid(), "raise")
    with pytest.raises(ValueError, match="^bad item ") as err:
        list(run_streaming(task, iter(range(10)), helpers=1))
    assert "_fail_or_die_in_helper" in err.value.__notes__[0]
    task = functools.partial(_fail_or_die_in_helper, os.getpid(), "kill")
    with pytest.raises(ChatsftError, match=r"died \(exit code -9"):
        list(run_streaming(task, iter(range(10)), helpers=1))
