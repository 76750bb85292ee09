"""Batch verification (`verify_batch`) in worker processes.

Workers are started by forkserver, else spawn: math-verify's timeouts use SIGALRM, which only works in a process's
main thread. Each answer has a timeout: a worker stuck on an answer is killed and replaced, a worker that dies is
replaced, and the answer it held scores 0 and is counted. Answers longer than `max_chars` score 0 without any work.
The pool persists across calls (RLVR calls once per rollout batch) and is shut down at exit. `workers=0` verifies
in-process: fastest for cheap verifiers (gsm8k, simple ifeval), but with no protection from a hanging answer beyond
math-verify's own timeouts.
"""

import atexit
import collections
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time

from nanotulu.rewards import math as math_verifier
from nanotulu.rewards.dispatch import verify
from nanotulu.rewards.ifeval import split_sentences
from nanotulu.rewards.language import detect_language

_log = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 100_000  # ~25k tokens; Tulu 3 answers are at most 2048 tokens


def _worker_main(conn):
    """Worker process: receives (math_timeout_s, chunk of [(index, dataset, response, ground_truth,
    all_or_nothing)]), sends back (index, status, score or message) per answer, in order. The parent times each
    answer from the previous reply."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business; it shuts us down
    try:
        # Import math-verify, warm sympy, load langdetect's profiles and Punkt before the first timed answer.
        math_verifier.verify_math("\\boxed{1}", "1")
        math_verifier.verify_math("\\boxed{\\frac{1}{2}}", "0.5")
        detect_language("Warm up the language profiles.")
        split_sentences("Warm up. Punkt too.")
    except Exception:
        pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        math_verifier.MATH_TIMEOUT_S, chunk = chunk  # this worker's copy of the math verifier's timeout
        for index, dataset, response, ground_truth, all_or_nothing in chunk:
            try:
                score = verify(dataset, response, ground_truth, ifeval_all_or_nothing=all_or_nothing)
                conn.send((index, "ok", score))
            except Exception as e:
                conn.send((index, "error", f"{type(e).__name__}: {e}"[:300]))


class _Pool:
    """A fixed number of worker processes, each fed one chunk at a time over its own pipe. Timing answers one by
    one in the parent lets us kill exactly the worker that hangs and re-queue the rest of its chunk."""

    def __init__(self, workers):
        methods = multiprocessing.get_all_start_methods()
        self.ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self.ctx.get_start_method() == "forkserver":
            # Import once in the fork server, so that a replacement worker starts in milliseconds. This only takes
            # effect if no forkserver is running yet in this process.
            self.ctx.set_forkserver_preload(["__main__", "nanotulu.rewards", "math_verify"])
        self.owner_pid = os.getpid()
        self.procs = [None] * workers
        self.conns = [None] * workers
        self.ready = [False] * workers
        self.start_failures = [0] * workers
        self.restarts = 0
        for w in range(workers):
            self._start(w)
        self.wait_until_ready(120.0)  # all of them, so that the first batch is spread over every worker
        if not any(self.ready):
            self.close(kill=True)
            raise RuntimeError("no reward worker process could start")

    def wait_until_ready(self, timeout):
        """Waits up to `timeout` s for each worker that has not yet said "ready" (a replacement still loading)."""
        for w in range(len(self.procs)):
            if not self.ready[w] and self.conns[w].poll(timeout):
                try:
                    self.ready[w] = self.conns[w].recv()[0] == "ready"
                except (EOFError, OSError):
                    pass

    def _start(self, w):
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child_conn,), daemon=True)
        proc.start()
        child_conn.close()
        self.procs[w], self.conns[w], self.ready[w] = proc, parent_conn, False

    def _replace(self, w):
        proc = self.procs[w]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        self.conns[w].close()
        self.restarts += 1
        self._start(w)

    def _drop_held_answer(self, w, busy, queue, results, status):
        """Worker w died or hung on its current answer: that answer scores 0 with `status`, the rest of its chunk
        goes back to the front of the queue, and a fresh worker replaces it."""
        chunk, pos, _ = busy.pop(w)
        results[chunk[pos][0]] = (status, 0.0)
        if pos + 1 < len(chunk):
            queue.appendleft(chunk[pos + 1 :])
        self._replace(w)

    def run(self, tasks, timeout, chunk_size, math_timeout_s, startup_timeout=120.0):
        """tasks: [(index, dataset, response, ground_truth, all_or_nothing)] -> {index: (status, score)}."""
        results = {}
        queue = collections.deque(tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size))
        busy = {}  # worker -> [chunk, position in chunk, time the current answer started]
        started = {w: time.monotonic() for w in range(len(self.procs)) if not self.ready[w]}
        while queue or busy:
            now = time.monotonic()
            for w in range(len(self.procs)):
                if self.ready[w] and w not in busy and not self.procs[w].is_alive():
                    self._replace(w)  # died while idle (killed between calls)
                    started[w] = time.monotonic()
                if queue and self.ready[w] and w not in busy:
                    chunk = queue.popleft()
                    self.conns[w].send((math_timeout_s, chunk))
                    busy[w] = [chunk, 0, time.monotonic()]
            waiting = [self.conns[w] for w in busy] + [self.conns[w] for w in started]
            deadlines = [b[2] + timeout for b in busy.values()] + [t + startup_timeout for t in started.values()]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            for conn in multiprocessing.connection.wait(waiting, timeout=wait_s):
                w = self.conns.index(conn)
                while True:
                    try:
                        if not conn.poll():
                            break
                        msg = conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, OOM killer, os._exit)
                        if w in started:
                            self.start_failures[w] += 1
                            if self.start_failures[w] >= 3:
                                raise RuntimeError("a reward worker process died 3 times while starting") from None
                            self._replace(w)
                            started[w] = time.monotonic()
                            break
                        self._drop_held_answer(w, busy, queue, results, "error")
                        started[w] = time.monotonic()
                        break
                    if msg[0] == "ready":
                        self.ready[w] = True
                        self.start_failures[w] = 0
                        started.pop(w, None)
                        continue
                    index, status, value = msg
                    results[index] = (status, value) if status == "ok" else (status, 0.0, value)
                    busy[w][1] += 1
                    busy[w][2] = time.monotonic()
                    if busy[w][1] == len(busy[w][0]):
                        del busy[w]
                        break
            now = time.monotonic()
            for w in [w for w, b in busy.items() if now - b[2] > timeout]:
                self._drop_held_answer(w, busy, queue, results, "timeout")
                started[w] = time.monotonic()
            for w in [w for w, t in started.items() if now - t > startup_timeout]:
                raise RuntimeError(f"a reward worker process did not start within {startup_timeout:.0f} s")
        return results

    def close(self, kill=False):
        if os.getpid() != self.owner_pid:
            return  # a forked child must not touch its parent's workers
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=0 if kill else 2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        for conn in self.conns:
            conn.close()


_POOL = None
_POOL_LOCK = threading.Lock()


def shutdown_pool():
    """Stops the persistent worker pool (also registered to run at exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown_pool)


def _get_pool(workers):
    global _POOL
    if _POOL is not None and _POOL.owner_pid != os.getpid():
        _POOL = None  # inherited through fork: the workers belong to the parent
    if _POOL is not None and len(_POOL.procs) != workers:
        _POOL.close()
        _POOL = None
    if _POOL is None:
        _POOL = _Pool(workers)
    return _POOL


def verify_batch(
    datasets,
    responses,
    ground_truths,
    *,
    workers=min(4, os.cpu_count() or 1),
    timeout=5.0,
    max_chars=DEFAULT_MAX_CHARS,
    ifeval_all_or_nothing=False,
    chunk_size=None,
):
    """Scores of many responses -> (scores: list[float], stats: dict of counts ok / timeout / error / too_long,
    plus workers_restarted and seconds). A response longer than max_chars, or one whose verification raises, hangs
    past `timeout` seconds or kills its worker, scores 0 and is counted; training never stops for it.
    workers=0 verifies in this process (no timeout beyond math-verify's own). Worker processes are started the
    multiprocessing way: the calling program must be a file or module (not stdin) with an `if __name__ ==
    "__main__":` guard."""
    global _POOL
    n = len(responses)
    if not (len(datasets) == len(ground_truths) == n):
        raise ValueError(f"verify_batch: {len(datasets)} datasets, {n} responses, {len(ground_truths)} ground truths")
    t0 = time.perf_counter()
    scores = [0.0] * n
    stats = {"ok": 0, "timeout": 0, "error": 0, "too_long": 0, "workers_restarted": 0}
    tasks = []
    for i in range(n):
        if not isinstance(responses[i], str):
            stats["error"] += 1
        elif len(responses[i]) > max_chars:
            stats["too_long"] += 1
        else:
            tasks.append((i, datasets[i], responses[i], ground_truths[i], ifeval_all_or_nothing))
    messages = []  # why verifications raised: the first is logged
    if workers == 0:
        for i, dataset, response, gt, aon in tasks:
            try:
                scores[i] = verify(dataset, response, gt, ifeval_all_or_nothing=aon)
                stats["ok"] += 1
            except Exception as e:
                stats["error"] += 1
                messages.append(f"{type(e).__name__}: {e}"[:300])
    elif tasks:
        # math-verify's own timeout sits above ours so the pool's kill is what stops a hanging answer.
        math_timeout_s = max(1, math.ceil(timeout)) + 1
        if chunk_size is None:
            chunk_size = max(1, min(64, len(tasks) // (4 * workers)))
        with _POOL_LOCK:
            pool = _get_pool(workers)
            restarts_before = pool.restarts
            try:
                results = pool.run(tasks, timeout, chunk_size, math_timeout_s)
            except BaseException:
                # Interrupted (Ctrl-C) or broken: workers may still hold answers of this batch, whose late replies
                # must never be read as the next batch's. Drop the pool; the next call starts a fresh one.
                pool.close(kill=True)
                _POOL = None
                raise
            stats["workers_restarted"] = pool.restarts - restarts_before
        for i, (status, score, *message) in results.items():
            scores[i] = score
            stats[status] += 1
            messages += message
    if messages:
        _log.warning("%d reward verifications raised (scored 0), first: %s", len(messages), messages[0])
    stats["seconds"] = time.perf_counter() - t0
    return scores, stats
