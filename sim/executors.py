"""Where the many simulations of a sweep or a plan run: a local process pool, in-process, or a Ray cluster.

Every executor has the ``concurrent.futures`` shape (``submit`` returns a ``Future``; used as a context
manager), so ``sim.sweep`` and ``sim.plan`` schedule work the same way whatever runs it. Ray is an
optional extra (``pip install 'moesim[ray]'``), imported only when asked for.

On a Ray cluster every node needs moesim installed (the same version) and the scenario's input files
(traces) at the same paths; results come back to the driver, which writes every output file."""

from __future__ import annotations

import socket
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

from sim.errors import MoesimError

EXECUTORS = ("local", "ray")


class InlineExecutor(Executor):
    """Runs each task at submit time in this process (``--jobs 1``): simplest to debug, no pickling."""

    max_in_flight = 1  # callers submit the next task only after handling this one's result

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a pool would
            future.set_exception(exc)
        return future


class RayExecutor(Executor):
    """Submits each task as a Ray remote function; ``ObjectRef.future()`` gives the ``Future``.

    Joins the Ray instance already initialised in this process, else connects to ``address``, else
    (no address) starts a local instance that ``shutdown`` stops again."""

    def __init__(self, address: str | None = None, jobs: int | None = None) -> None:
        ray = _import_ray()
        self._ray = ray
        self._owned = False
        self._remote: dict[Callable[..., Any], Any] = {}
        if not ray.is_initialized():
            if address:
                _check_reachable(address)
            try:
                ray.init(address=address, num_cpus=None if address else jobs, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise MoesimError(f"--executor ray: cannot connect to {where}: {str(exc).splitlines()[0]}") from None
            self._owned = True

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(fn)
        return remote.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._owned:
            self._ray.shutdown()
            self._owned = False


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MoesimError("--executor ray: Ray is not installed; install it with: pip install 'moesim[ray]'") from None
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, on an address nothing answers at (Ray itself retries for minutes)."""
    if address == "auto" or address.startswith("local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise MoesimError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MoesimError(f"--address {address}: no Ray cluster reachable at {host}:{port} ({reason})") from None


def make_executor(executor: str = "local", jobs: int | None = None, address: str | None = None) -> Executor:
    """The executor for ``--executor`` / ``--jobs`` / ``--address``."""
    if executor == "ray":
        return RayExecutor(address, jobs)
    if executor != "local":
        raise MoesimError(f"--executor {executor}: expected one of {', '.join(EXECUTORS)}")
    if address:
        raise MoesimError("--address is for --executor ray")
    if jobs == 1:
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=jobs)
