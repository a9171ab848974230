"""Run numbered tasks in this process and in helper processes, and take the results back in order.

Eager preprocessing uses it to encode chunks of conversations on every core. Why not `multiprocessing.Pool`:
its parent only collects results, so with one worker per core the parent's own work competes with them for the
cores (on 2 cores, encoding a share in the parent took 5,000 conversations from 0.45 to 0.36 s); it hands out
tasks up front in equal shares, so a slower core (a busy one, a hyperthread) makes the others wait at the end;
and a worker killed by the kernel (out of memory) leaves `imap` waiting forever. Here the parent and the helpers
take the next task number from a shared counter whenever they are free, the parent only when the next result it
must yield is not ready, and a helper that dies is reported.

Under `fork` the helpers inherit the task (a callable with its data) without pickling; under `spawn` it is
pickled once per helper. Results should be small (a file name, counts): a helper's result goes through a pipe,
and a result larger than the pipe's buffer would hold the helper until the parent is free to read it.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Iterator
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
                        error, text = payload
                        if error is None:
                            raise RuntimeError(f"a preprocessing process failed on task {index}:\n{text}")
                        error.add_note(f"raised in a preprocessing process, task {index}:\n{text}")
                        raise error
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
    parents_end.close()  # inherited with fork: held open here, it would let a dead parent's pipe fill and block us
    try:
        # a parent killed outright (SIGKILL, SIGTERM's default action) leaves us orphaned: stop at the next task
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


def _died(exitcode: int) -> ChatsftError:
    return ChatsftError(
        f"a preprocessing process died (exit code {exitcode}; -9 is usually the kernel stopping it for lack of "
        "memory): retry with fewer --preprocessing_num_workers, or use --lazy_preprocess"
    )
