"""Environments in subprocesses: a crashed or hung simulator costs one episode, never the run.

ScienceWorld and TextWorldExpress are JVMs behind py4j; a JVM that dies (OOM killer, segfault)
or stops answering would otherwise hang or kill exploration. An :class:`EnvWorker` runs one env
in a spawned process; a crash or a call past ``step_timeout`` kills the process tree, raises
:class:`EnvWorkerError` for that call, and the next call starts a fresh process.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from etokit.envs.base import Reset, Step
from etokit.errors import EtokitError
from etokit.faults import faultpoint

T = TypeVar("T")
R = TypeVar("R")


class EnvWorkerError(RuntimeError):
    """The environment process crashed, hung, or raised: the episode is an error, not a result."""


# --------------------------------------------------------------------------------------------
# JVM servers (shared by the py4j-backed environments)


class JavaServer:
    """A py4j gateway to a JVM that this process owns and really stops on :meth:`close`.

    ``die_on_exit`` makes the JVM exit when our end of its stdin closes, so it cannot outlive a
    worker that is SIGKILLed; ``-Xmx`` caps the heap, which otherwise grows to gigabytes.
    """

    def __init__(self, jar: str, cwd: str, heap: str = "512m", java_opts: Iterable[str] = ()):
        from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway

        port, self.process = launch_gateway(
            classpath=jar, cwd=cwd, die_on_exit=True, javaopts=[f"-Xmx{heap}", *java_opts], return_proc=True
        )
        self.gateway = JavaGateway(
            gateway_parameters=GatewayParameters(auto_field=True, port=port), java_process=self.process
        )
        self.jvm = self.gateway.jvm

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        try:
            self.gateway.shutdown()
        except Exception:  # a dead JVM cannot be shut down politely
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


# --------------------------------------------------------------------------------------------
# One env in one process


def _serve(conn, name: str, options: dict[str, Any]) -> None:
    """Worker main loop: answer ``(method, args)`` with ``("ok", value, max_steps)`` or an error."""
    from etokit.envs.registry import make

    try:
        env = make(name, **options)
    except BaseException as e:  # report instead of dying silently, then exit
        conn.send(("error", _portable(e), None))
        return
    conn.send(("ok", env.name, env.max_steps))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break
        if method == "close":
            env.close()
            conn.send(("ok", None, env.max_steps))
            break
        faultpoint(f"worker.{method}")  # crash tests: this worker dies or hangs in the middle of an episode
        try:
            value = getattr(env, method)(*args)
        except BaseException as e:
            conn.send(("error", _portable(e), env.max_steps))
            continue
        conn.send(("ok", value, env.max_steps))


def _portable(e: BaseException) -> BaseException:
    """User errors cross the pipe as themselves; anything else as its traceback text."""
    if isinstance(e, EtokitError):
        return EtokitError(str(e))
    return EnvWorkerError("".join(traceback.format_exception(e)).rstrip())


class EnvWorker:
    """An :class:`~etokit.envs.base.Env` running in a subprocess, with the same methods.

    ``step_timeout`` bounds every call (reset loads a task, so it gets the same budget);
    ``start_timeout`` bounds starting the process and the env (a JVM takes seconds). After an
    :class:`EnvWorkerError` the worker is restarted on the next call; ``restarts`` counts them.
    """

    def __init__(
        self, name: str, options: dict[str, Any] | None = None, step_timeout: float = 60.0, start_timeout: float = 180.0
    ):
        self.env_name = name
        self.options = dict(options or {})
        self.step_timeout = step_timeout
        self.start_timeout = start_timeout
        self.restarts = 0
        self.name = name
        self.max_steps = 0
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._started_once = False
        self._start()

    # -- process management ------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_serve, args=(child, self.env_name, self.options), daemon=True, name=f"etokit-env-{self.env_name}"
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        status, value, max_steps = self._receive(self.start_timeout, "starting the environment")
        if status == "error":
            self._kill()
            raise value
        self.name, self.max_steps = value, max_steps

    def _receive(self, timeout: float, what: str):
        try:
            if not self._conn.poll(timeout):
                self._kill()
                raise EnvWorkerError(
                    f"{self.env_name} worker: no answer after {timeout:g}s while {what}; "
                    "killed it (restarted on the next call)"
                )
            return self._conn.recv()
        except (EOFError, ConnectionError, OSError) as e:
            code = self._proc.exitcode if self._proc is not None else None
            self._kill()
            raise EnvWorkerError(
                f"{self.env_name} worker died while {what} (exit code {code}); restarted on the next call"
            ) from e

    def _kill(self) -> None:
        """Stop the worker and everything it started (its JVM), without waiting for manners."""
        proc, self._proc = self._proc, None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if proc is None:
            return
        _kill_tree(proc.pid)
        proc.join(timeout=10)

    def _call(self, method: str, *args):
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self._kill()
            self._start()
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, ConnectionError, OSError) as e:
            self._kill()
            raise EnvWorkerError(f"{self.env_name} worker died before {method}(); restarted on the next call") from e
        status, value, max_steps = self._receive(self.step_timeout, f"running {method}()")
        if max_steps is not None:
            self.max_steps = max_steps
        if status == "error":
            if isinstance(value, EnvWorkerError):
                # The env raised something unexpected (its JVM is gone, say): start clean next time.
                self._kill()
            raise value
        return value

    # -- the Env protocol ---------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        return self._call("task_ids", split)

    def reset(self, task_id: str, max_steps: int | None = None) -> Reset:
        # Only the expert passes a limit: envs written before reset() took one still explore.
        return self._call("reset", task_id, *([] if max_steps is None else [max_steps]))

    def step(self, action: str) -> Step:
        return self._call("step", action)

    def expert(self, task_id: str) -> list[str] | None:
        return self._call("expert", task_id)

    def call(self, method: str, *args):
        """Any other method of the env (``valid_actions``, ...)."""
        return self._call(method, *args)

    def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            try:
                self._conn.send(("close", ()))
                self._conn.poll(min(self.step_timeout, 30.0)) and self._conn.recv()
            except (EOFError, ConnectionError, OSError):
                pass
        self._kill()

    def __enter__(self) -> "EnvWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_proc", None) is not None:
            self._kill()


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


# --------------------------------------------------------------------------------------------
# Several workers


@dataclass
class Outcome:
    """The result of one job run on a pool worker: ``value`` or ``error`` (as text)."""

    item: Any
    value: Any = None
    error: str | None = None


class WorkerPool:
    """``n`` :class:`EnvWorker` s; :meth:`map` runs ``fn(worker, item)`` for each item, one item per
    worker at a time, and yields an :class:`Outcome` per item as it finishes (completion order).

    An item whose ``fn`` raises :class:`EnvWorkerError` is reported as an error outcome; the worker
    restarts itself and takes the next item.
    """

    def __init__(self, name: str, options: dict[str, Any] | None = None, n: int = 1, step_timeout: float = 60.0):
        if n < 1:
            raise EtokitError(f"--workers must be at least 1, got {n}")
        # Start JVMs concurrently: each takes seconds, mostly waiting.
        with ThreadPoolExecutor(n) as ex:
            futures = [ex.submit(EnvWorker, name, options, step_timeout) for _ in range(n)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        self.workers = [f.result() for f in futures if f.exception() is None]
        if errors:
            self.close()
            raise errors[0]

    def map(self, fn: Callable[[EnvWorker, T], R], items: Iterable[T]) -> Iterator[Outcome]:
        free: queue.Queue[EnvWorker] = queue.Queue()
        for w in self.workers:
            free.put(w)
        done: queue.Queue[Outcome] = queue.Queue()

        def run(item):
            worker = free.get()
            try:
                done.put(Outcome(item, value=fn(worker, item)))
            except EnvWorkerError as e:
                done.put(Outcome(item, error=str(e)))
            except BaseException as e:  # surfaced to the caller in the main thread
                done.put(Outcome(item, error=f"{type(e).__name__}: {e}"))
            finally:
                free.put(worker)

        items = list(items)
        stop = threading.Event()
        with ThreadPoolExecutor(len(self.workers)) as ex:
            for item in items:
                ex.submit(lambda it=item: None if stop.is_set() else run(it))
            try:
                for _ in items:
                    yield done.get()
            finally:
                stop.set()

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
