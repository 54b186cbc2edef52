"""Retries for Hub calls, so that a push survives a flaky Hub or network.

What the clients do on their own (huggingface_hub 2.x, datasets 5.x): ``http_backoff`` retries
preupload, the LFS batch call and LFS uploads (5 retries, 1-8 s apart, ``Retry-After`` honoured);
``hf_hub_download`` retries its metadata call; ``Dataset.push_to_hub`` retries its commit on 412/409.
Every other API call (repo info, refs, tree, create repo/branch/tag, the commit itself) fails on the
first 5xx or dropped connection. And nothing times out: the shared HTTP client has no default
timeout and most API calls pass ``timeout=None``, so one stalled response hangs a push forever.
etokit adds two layers on top:

1. Requests. ``install()`` wraps the transport of huggingface_hub's shared client: a request
   without a timeout gets one (``ETOKIT_HUB_TIMEOUT``), and *idempotent* requests to the Hub (GET,
   HEAD and the read-only POSTs: preupload, paths-info, validate-yaml, the LFS batch call) are
   retried on 408/429/5xx, timeouts and dropped connections. Writes (commit, branch, tag, repo
   creation) are never re-sent blindly: a write whose response was lost may have been applied.
2. Operations. ``run(op)`` re-runs a whole operation from its start after a transient failure. The
   operations are written to converge: they read the Hub, then commit only what differs, with
   ``parent_commit`` set. A commit whose response was lost is found on the re-run (nothing left to
   commit, so no second commit), and a commit raced by a concurrent push fails with 412 instead of
   silently building on a head it never read.

Both back off exponentially with jitter and honour ``Retry-After``. The budget of an operation starts
at its first failure (a long, healthy upload is never cut short) and is shared by everything inside
it: past it, no layer retries, huggingface_hub's own backoff included, and the operation fails with
one line naming what did not complete and saying that it can be re-run.
Settings: ``ETOKIT_HUB_TIMEOUT`` (seconds a request may stall, default 60) and
``ETOKIT_HUB_RETRY_SECONDS`` (how long an operation keeps retrying, default 300).
"""

from __future__ import annotations

import contextvars
import email.utils
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from huggingface_hub.utils import _http as _hf_http

from etokit.errors import EtokitError, ServiceUnavailable

# The HTTP library huggingface_hub talks through: httpx2 from 2.x on, httpx before.
httpx = getattr(_hf_http, "httpx2", None) or getattr(_hf_http, "httpx")

logger = logging.getLogger("etokit.hub")

T = TypeVar("T")

# What a retry may fix: a timeout, rate limiting, a server or gateway error.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# POSTs that only read: the Hub's answer depends on its state, never changes it.
_READ_ONLY_POSTS = ("/preupload/", "/paths-info/", "/info/lfs/objects/batch")
_READ_ONLY_POST_PATHS = ("/api/validate-yaml",)


@dataclass(frozen=True)
class RetryPolicy:
    total_s: float = 300.0  # an operation retries for this long after its first failure
    request_s: float = 60.0  # one idempotent request is retried for at most this long
    timeout_s: float = 60.0  # a request that stalls this long fails (the client's default: never)
    base_s: float = 0.5  # first backoff; doubles per attempt...
    cap_s: float = 10.0  # ...up to this
    max_retry_after_s: float = 120.0  # a request waits no longer than this; its operation decides

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        def num(name: str, default: float) -> float:
            raw = os.environ.get(name)
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise EtokitError(f"{name}={raw!r}: expected a number of seconds") from None
            if value <= 0:
                raise EtokitError(f"{name}={raw!r}: must be positive")
            return value

        total = num("ETOKIT_HUB_RETRY_SECONDS", cls.total_s)
        timeout = num("ETOKIT_HUB_TIMEOUT", cls.timeout_s)
        return cls(total_s=total, request_s=min(cls.request_s, total), timeout_s=timeout)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (1, 2, ...): exponential, capped, with "equal
        jitter" (half fixed, half random) so that concurrent clients spread out."""
        delay = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return delay / 2 + (rng or random).uniform(0, delay / 2)


_policy: RetryPolicy | None = None


@dataclass
class _Budget:
    """The retry budget of one operation, shared by the steps and requests inside it."""

    total_s: float
    deadline: float | None = None  # set by the first failure
    tries: int = 0

    def failed(self, now: float) -> None:
        if self.deadline is None:
            self.deadline = now + self.total_s

    def spent(self, now: float, delay: float = 0.0) -> bool:
        return self.deadline is not None and now + delay >= self.deadline


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("etokit_hub_budget", default=None)
_install_lock = threading.Lock()


def policy() -> RetryPolicy:
    return _policy or RetryPolicy.from_env()


def configure(new: RetryPolicy | None) -> None:
    """Use ``new`` (None: back to the environment's settings) from now on, and re-install the client."""
    global _policy
    _policy = new
    install(force=True)


class Transient(Exception):
    """Raised by an operation for a state worth retrying that is not an HTTP error: a branch that
    moved under it, a verification that did not match yet."""


def status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """May running the operation again succeed? 412 counts: the branch moved (a concurrent push),
    and an operation re-reads the head when it starts again."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, Transient):
        return True
    status = status_of(exc)
    if status is not None:
        return status in RETRY_STATUS or status == 412
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, LocalEntryNotFoundError):
        # hf_hub_download's "cannot reach the Hub and not cached": what matters is why.
        cause = exc.__cause__ or exc.__context__
        return cause is None or is_transient(cause)
    return False


def retry_after(response) -> float | None:
    """The server's ``Retry-After`` (seconds or an HTTP date) as seconds, if it sent one."""
    value = (getattr(response, "headers", None) or {}).get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def describe(exc: BaseException) -> str:
    """One line about a failure. huggingface_hub's messages carry the URL, never the token; query
    strings are cut anyway (an upload URL may be pre-signed)."""
    status = status_of(exc)
    text = str(exc).splitlines()[0] if status is not None and str(exc) else " ".join(str(exc).split())
    text = _QUERY.sub(r"\1", text or type(exc).__name__)
    return (f"HTTP {status}: {text}" if status is not None else f"{type(exc).__name__}: {text}")[:300]


def run(
    op: Callable[[], T],
    *,
    what: str,
    retry_policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``op`` (safe to re-run from its start) until it succeeds. Transient failures are retried
    with backoff, at least ``Retry-After`` apart, for ``total_s`` after the first one; then an
    EtokitError names ``what``. A ``run`` inside another (a step of an operation) shares the outer
    one's budget, and when that is spent it lets the outer one report, naming the operation."""
    pol = retry_policy or policy()
    start = clock()
    budget = _budget.get()
    owner = budget is None
    if owner:
        budget = _Budget(pol.total_s)
        token = _budget.set(budget)
    try:
        attempt = 0
        while True:
            attempt += 1
            budget.tries += 1
            try:
                return op()
            except Exception as e:  # noqa: BLE001 - classified right below
                if not is_transient(e):
                    raise
                now = clock()
                budget.failed(now)
                # Never sooner than the server asked; a wait longer than the budget ends here.
                delay = max(pol.backoff(attempt), retry_after(getattr(e, "response", None)) or 0.0)
                if budget.spent(now, delay):
                    if not owner:
                        raise  # the operation this step belongs to reports
                    raise ServiceUnavailable(
                        f"{what}: the Hub still failed after {budget.tries} attempts in {now - start:.0f}s "
                        f"(last: {describe(e)}). Each commit is all-or-nothing; re-run the same command to "
                        "finish: what already landed is not pushed twice."
                    ) from e
                logger.warning("%s: %s; retrying in %.1fs (attempt %d)", what, describe(e), delay, attempt + 1)
                sleep(delay)
    finally:
        if owner:
            _budget.reset(token)


# -- the request layer ---------------------------------------------------------------------------


def _hub_origins() -> set[tuple[str, int | None]]:
    """Where the Hub is: huggingface_hub's endpoint, and datasets' if it was pointed elsewhere."""
    import sys
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoints = {constants.ENDPOINT}
    if "datasets" in sys.modules:
        config = getattr(sys.modules["datasets"], "config", None)
        endpoints.add(getattr(config, "HF_ENDPOINT", None) or constants.ENDPOINT)
    origins = set()
    for e in endpoints:
        u = urlsplit(e)
        origins.add((u.hostname or "", u.port or (443 if u.scheme == "https" else 80)))
    return origins


def _replayable(request) -> bool:
    """An idempotent request to the Hub whose body (if any) is in memory, so it can be sent again as
    is. Other hosts are left alone: datasets probes a few optional ones that are expected to fail fast."""
    method, path = request.method, request.url.path
    if (request.url.host, request.url.port or (443 if request.url.scheme == "https" else 80)) not in _hub_origins():
        return False
    read_only_post = any(p in path for p in _READ_ONLY_POSTS) or path.endswith(_READ_ONLY_POST_PATHS)
    if not (method in ("GET", "HEAD", "OPTIONS") or method == "POST" and read_only_post):
        return False
    return isinstance(request.stream, httpx.ByteStream)


class BudgetSpent(httpx.TransportError):
    """A failed request once its operation's retry budget is spent. huggingface_hub's own backoff
    retries timeouts, network errors and 5xx answers, but not this: the operation ends at once."""


def _spent(request, failure) -> BudgetSpent:
    if isinstance(failure, Exception):
        reason = f"{type(failure).__name__}: {failure}"
    else:
        reason = f"HTTP {failure.status_code}"
        failure.close()
    return BudgetSpent(f"{reason} ({request.method} {request.url.path}); retry budget spent", request=request)


class RetryingTransport:
    """Wraps an httpx transport: idempotent requests are retried (see the module docstring);
    every other request goes through once, untouched."""

    def __init__(self, inner, get_policy: Callable[[], RetryPolicy] = policy, sleep=time.sleep):
        self.inner, self.get_policy, self.sleep = inner, get_policy, sleep

    def handle_request(self, request):
        pol = self.get_policy()
        # huggingface_hub passes `timeout=None` explicitly on most API calls, which overrides the
        # client's default and means "wait forever": a request without a limit gets the policy's.
        limits = dict(request.extensions.get("timeout") or {})
        for key in ("connect", "read", "write", "pool"):
            if limits.get(key) is None:
                limits[key] = pol.timeout_s
        request.extensions["timeout"] = limits
        budget = _budget.get()
        if not _replayable(request):
            return self._once(request, budget)
        first_failure = None
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.inner.handle_request(request)
            except httpx.TransportError as e:
                failure, reason, hint = e, type(e).__name__, None
            else:
                if response.status_code not in RETRY_STATUS:
                    return response
                failure, reason, hint = response, f"HTTP {response.status_code}", retry_after(response)
            now = time.monotonic()
            first_failure = first_failure or now
            if budget is not None:
                budget.failed(now)
            delay = pol.backoff(attempt)
            if hint is not None and hint <= pol.max_retry_after_s:
                delay = max(delay, hint)
            error = failure if isinstance(failure, Exception) else None
            if budget is not None and budget.spent(now, delay):
                raise _spent(request, failure) from error
            if (hint is not None and hint > pol.max_retry_after_s) or now + delay >= first_failure + pol.request_s:
                if error is not None:
                    raise error
                return failure  # the caller sees the last answer as it was
            if error is None:
                failure.close()
            logger.info("Hub %s %s: %s; retrying in %.1fs", request.method, request.url.path, reason, delay)
            self.sleep(delay)

    def _once(self, request, budget):
        """A request that is not retried here (a write, or a body that cannot be sent again). Past the
        operation's budget its failure still ends the operation at once (see _spent)."""
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError as e:
            if budget is not None:
                budget.failed(time.monotonic())
                if budget.spent(time.monotonic()):
                    raise _spent(request, e) from e
            raise
        if response.status_code in RETRY_STATUS and budget is not None:
            budget.failed(time.monotonic())
            if budget.spent(time.monotonic()):
                raise _spent(request, response)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.__exit__(*exc)


def _wrap(transport):
    return transport if transport is None or isinstance(transport, RetryingTransport) else RetryingTransport(transport)


def _client_factory():
    """huggingface_hub's own client (its request hooks: offline mode, request ids), with a timeout
    and the retrying transport; proxies from the environment are kept, since every transport the
    client mounted is wrapped.

    This rests on two things no public API offers: huggingface_hub's ``default_client_factory``
    and an httpx2 client's ``_transport`` / ``_mounts``. setup.cfg pins the huggingface_hub range
    this is tested on, and tests/test_hub_retry.py fails when either changes; should they change
    anyway, the client is used without retries and a warning says so, rather than failing calls."""
    client = _hf_http.default_client_factory()
    pol = policy()
    client.timeout = httpx.Timeout(pol.timeout_s, connect=min(pol.timeout_s, 30.0))
    if isinstance(getattr(client, "_transport", None), httpx.BaseTransport) and isinstance(
        getattr(client, "_mounts", None), dict
    ):
        client._transport = _wrap(client._transport)
        client._mounts = {pattern: _wrap(t) for pattern, t in client._mounts.items()}
    else:
        logger.warning(
            "etokit: this huggingface_hub's HTTP client has no transport etokit can wrap; Hub requests "
            "are not retried (install a huggingface-hub in the range etokit's setup.cfg names)"
        )
    return client


_client_factory.etokit = True  # type: ignore[attr-defined]


def install(force: bool = False) -> bool:
    """Make huggingface_hub's shared client etokit's (timeout + retries), unless the program set its
    own client factory (then its settings win). Returns whether etokit's client is in use."""
    from huggingface_hub import set_client_factory

    with _install_lock:
        current = getattr(_hf_http, "_GLOBAL_CLIENT_FACTORY", None)
        if getattr(current, "etokit", False) and not force:
            return True
        if current is not _hf_http.default_client_factory and not getattr(current, "etokit", False):
            logger.debug("huggingface_hub has a custom client factory: etokit leaves its timeouts and retries alone")
            return False
        set_client_factory(_client_factory)
        return True
