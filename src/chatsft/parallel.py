"""Run numbered tasks in this process and in helper processes, and take the results back in order.

Eager preprocessing uses it to encode chunks of conversations on every core. Why not `multiprocessing.Pool`:
its parent only collects results, so with one worker per core the parent's own work competes with them for the
cores (on 2 cores, encoding a share in the parent took 5,000 conversations from 0.45 to 0.36 s); it hands out
tasks up front in equal shares, so a slower core (a busy one, a hyperthread) makes the others wait at the end;
and a worker killed by the kernel (out of memory) leaves `imap` waiting forever. Here the parent and the
helpers take the next task number from a shared counter whenever they are free, the parent only when the next
result it must yield is not ready, and a helper that dies is reported. `run_streaming` does the same for a
stream of items that must not be held at once (records read from a file): they go to idle helpers by pipe.

Under `fork` the helpers inherit the task (a callable with its data) without pickling; under `spawn` it is
pickled once per helper. Results should be small (a file name, counts): a helper's result goes through a pipe,
and a result larger than the pipe's buffer would hold the helper until the parent is free to read it.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import multiprocessing
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait
from typing import TypeVar

from chatsft.errors import ChatsftError

T = TypeVar("T")


def run_in_order(task: Callable[[int], T], n: int, helpers: int) -> Iterator[T]:
    """Yield task(0), ..., task(n - 1), computed by this process and `helpers` child processes."""
    if helpers <= 0 or n <= 1:
        for k in range(n):
            yield task(k)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    counter = context.Value("q", 0)  # the next task number to take
    procs, conns = [], []
    gc.freeze()  # the helpers' garbage collector then never touches (and so copies) the parent's objects
    try:
        for _ in range(min(helpers, n - 1)):
            receive, send = context.Pipe(duplex=False)
            proc = context.Process(
                target=_helper, args=(task, counter, n, send, receive, os.getpid()), daemon=True
            )
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(receive)
    finally:
        gc.unfreeze()
    done: dict[int, T] = {}
    live, finished = list(conns), False
    try:
        for k in range(n):
            while k not in done:
                ready = wait(live, timeout=0) if live else []
                if not ready:
                    mine = _take(counter, n)
                    if mine is not None:
                        done[mine] = task(mine)
                        continue
                    if not live:
                        raise RuntimeError(f"task {k} was taken but never finished")
                    ready = wait(live)
                for conn in ready:
                    try:
                        kind, index, payload = conn.recv()
                    except EOFError:  # the helper has nothing left to take, or it died
                        live.remove(conn)
                        proc = procs[conns.index(conn)]
                        proc.join()
                        if proc.exitcode:
                            raise _died(proc.exitcode) from None
                        continue
                    if kind == "error":  # raised again here, as if the task had failed in this process
                        raise _raised(index, payload)
                    done[index] = payload
            yield done.pop(k)
        finished = True
    finally:
        for proc in procs:
            if finished:  # all results are in; a helper's exit (unmapping its copy of a large parent) takes
                threading.Thread(target=proc.join, daemon=True).start()  # milliseconds: reap it meanwhile
                continue
            if proc.is_alive():
                proc.terminate()  # stopped early: the helpers' work is not wanted
            proc.join()
        for conn in conns:
            conn.close()


def _take(counter, n: int) -> int | None:
    with counter.get_lock():
        k = counter.value
        if k >= n:
            return None
        counter.value = k + 1
    return k


def _helper(task: Callable[[int], object], counter, n: int, conn, parents_end, parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no thread pool inside
    parents_end.close()  # inherited with fork: held open here, a dead parent's pipe could fill and block us
    try:
        # a parent killed outright (SIGKILL, SIGTERM's default action) leaves us orphaned: stop at next task
        while os.getppid() == parent and (k := _take(counter, n)) is not None:
            try:
                message = ("ok", k, task(k))
            except BaseException as error:
                message = ("error", k, (_picklable(error), traceback.format_exc()))
            try:
                conn.send(message)
            except ConnectionError:  # the parent is gone
                return
            if message[0] == "error":
                return
    finally:
        conn.close()


def _picklable(error: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return None
    return error


def _raised(index: int, payload) -> BaseException:
    """The error a helper reported for task `index`, to raise here as if the task had failed here."""
    error, text = payload
    if error is None:  # it could not travel: its traceback does
        return RuntimeError(f"a preprocessing process failed on task {index}:\n{text}")
    error.add_note(f"raised in a preprocessing process, task {index}:\n{text}")
    return error


def _exitcode(proc) -> int:
    proc.join(10)  # it is gone or going: its pipe failed
    return proc.exitcode or -1


def _died(exitcode: int) -> ChatsftError:
    return ChatsftError(
        f"a preprocessing process died (exit code {exitcode}; -9 is usually the kernel stopping it for lack "
        "of memory): retry with fewer --preprocessing_num_workers, or use --lazy_preprocess"
    )


def run_streaming(task: Callable[[object], T], items: Iterable, helpers: int, ahead: int = 2) -> Iterator[T]:
    """Yield task(item) for each item of `items` in order, computed by this process and `helpers` child
    processes, taking items from `items` only as they can be worked on: at most `ahead` items per process are
    taken but not yet yielded, so memory does not grow with the length of `items` (a stream of conversations
    read from a file). Items go to the helpers through pipes (pickled: keep items to a few MB), up to DEPTH at
    a time each, so a helper always has its next item while this process is busy; when every helper has DEPTH
    and the next result is not ready, this process takes the next item itself. Producing `items` (reading and
    validating) is work of this process too, done between dispatches."""
    items = iter(items)
    if helpers <= 0:
        for item in items:
            yield task(item)
        return
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    procs, conns = [], []
    gc.freeze()
    try:
        for _ in range(helpers):
            mine, theirs = context.Pipe(duplex=True)
            proc = context.Process(target=_stream_helper, args=(task, theirs, mine, os.getpid()), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
    finally:
        gc.unfreeze()
    queued = {conn: collections.deque() for conn in conns}  # the sequence numbers each helper holds, in order
    done: dict[int, T] = {}
    taken = yielded = 0
    exhausted, finished, limit = False, False, max(ahead, DEPTH) * (helpers + 1)

    def take():
        nonlocal taken, exhausted
        if exhausted or taken - yielded >= limit:
            return None
        try:
            item = next(items)
        except StopIteration:
            exhausted = True
            return None
        taken += 1
        return taken - 1, item

    try:
        while True:
            while True:  # fill the helpers, the emptiest first
                conn = min(conns, key=lambda c: len(queued[c]))
                if len(queued[conn]) >= DEPTH or (job := take()) is None:
                    break
                try:
                    conn.send(job)
                except OSError:  # the helper is gone (killed: its end was closed, or reset)
                    raise _died(_exitcode(procs[conns.index(conn)])) from None
                queued[conn].append(job[0])
            if yielded in done:
                yield done.pop(yielded)
                yielded += 1
                continue
            busy = [c for c in conns if queued[c]]
            if exhausted and not busy and yielded == taken:
                break
            ready = wait(busy, timeout=0) if busy else []
            if not ready:
                if (job := take()) is not None:
                    done[job[0]] = task(job[1])
                    continue
                ready = wait(busy)
            for conn in ready:
                try:
                    kind, index, payload = conn.recv()
                except (EOFError, OSError):  # reset, not EOF, when it died holding an item unread
                    raise _died(_exitcode(procs[conns.index(conn)])) from None
                if kind == "error":
                    raise _raised(index, payload)
                given = queued[conn].popleft()
                assert given == index  # a helper answers in the order it was given
                done[index] = payload
        finished = True
    finally:
        for conn in conns:
            if finished:  # tell each helper there is no more work
                with contextlib.suppress(OSError):
                    conn.send(None)
            conn.close()
        for proc in procs:
            if finished:
                threading.Thread(target=proc.join, daemon=True).start()
                continue
            if proc.is_alive():
                proc.terminate()
            proc.join()


DEPTH = 2  # items a streaming helper holds: the one it works on and the next (measured: with one, a helper
# waited for the parent to finish its own item, idle ~16% of the time on 2 cores)


def _stream_helper(task: Callable[[object], object], conn, parents_end, parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    parents_end.close()
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(conn, jobs, parent), daemon=True).start()
    try:
        while (job := jobs.get()) is not None:
            k, item = job
            try:
                message = ("ok", k, task(item))
            except BaseException as error:
                message = ("error", k, (_picklable(error), traceback.format_exc()))
            try:
                conn.send(message)
            except OSError:  # the parent is gone
                return
            if message[0] == "error":
                return
    finally:
        conn.close()


def _receive(conn, jobs: queue.SimpleQueue, parent: int) -> None:
    """A streaming helper's reader thread: the parent's items into `jobs` as they come (so the parent never
    waits for a busy helper to read), then None: no more work, or the parent is gone."""
    try:
        while os.getppid() == parent:  # orphaned (the parent killed outright): stop
            try:
                if not conn.poll(1.0):  # siblings hold copies of the parent's end: EOF may never come
                    continue
                job = conn.recv()
            except (EOFError, OSError):
                return
            if job is None:
                return
            jobs.put(job)
    finally:
        jobs.put(None)
