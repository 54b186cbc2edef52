"""etokit.hub.retry on its own: the operation layer on a fake clock, the request layer on a mock
transport, and the contract with huggingface_hub that the request layer rests on. The same
retries under real faults, through a proxy in front of the embedded Hub: tests/test_faults_hub.py."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import httpx2
import pytest
from packaging.requirements import Requirement

from etokit.errors import EtokitError, ServiceUnavailable
from etokit.hub import retry

FAST = retry.RetryPolicy(total_s=90, request_s=30, timeout_s=1.0, base_s=0.05, cap_s=0.5)


def test_installed_huggingface_hub_is_in_the_range_setup_cfg_pins():
    import huggingface_hub

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    (line,) = [r for r in cfg["options"]["install_requires"].splitlines() if r.startswith("huggingface-hub")]
    assert Requirement(line).specifier.contains(huggingface_hub.__version__), (line, huggingface_hub.__version__)


def test_the_shared_client_retries_through_every_transport_it_mounts(monkeypatch):
    """What the request layer needs of huggingface_hub: the factory that set_client_factory installs
    makes the client get_session() returns, and that client's own transport and every mounted one
    (proxies from the environment) are wrapped. A huggingface_hub whose client changed fails here."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http as hf_http
    from huggingface_hub.utils import close_session, get_session

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a mounted proxy transport
    original = hf_http._GLOBAL_CLIENT_FACTORY
    try:
        set_client_factory(hf_http.default_client_factory)
        assert retry.install(force=True)
        close_session()
        client = get_session()
        assert isinstance(client._transport, retry.RetryingTransport)
        assert client._mounts and all(
            isinstance(t, retry.RetryingTransport) for t in client._mounts.values() if t is not None
        )
        assert client.timeout.read == retry.policy().timeout_s
        # A program's own client factory wins: etokit leaves it alone.
        set_client_factory(hf_http.default_client_factory)
        custom = lambda: httpx2.Client()  # noqa: E731
        set_client_factory(custom)
        assert not retry.install()
    finally:
        set_client_factory(original)
        close_session()


def test_an_outage_is_its_own_error_and_exit_code():
    assert issubclass(ServiceUnavailable, EtokitError)
    assert (EtokitError.exit_code, ServiceUnavailable.exit_code) == (2, 3)


def test_retry_honours_retry_after_and_gives_up_on_budget():
    """The operation layer, on a fake clock: no real sleeping."""
    now = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    def rate_limited():
        response = httpx2.Response(429, headers={"Retry-After": "7"}, request=httpx2.Request("GET", "http://hub/x"))
        raise httpx2.HTTPStatusError("429", request=response.request, response=response)

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            rate_limited()
        return "done"

    pol = retry.RetryPolicy(total_s=60, base_s=0.5, cap_s=4)
    assert retry.run(flaky, what="x", retry_policy=pol, sleep=sleep, clock=lambda: now[0]) == "done"
    assert slept == [7.0, 7.0]  # Retry-After beats the shorter backoff

    now[0], slept[:] = 0.0, []
    with pytest.raises(ServiceUnavailable, match=r"push of x: the Hub still failed after \d+ attempts") as exc:
        retry.run(rate_limited, what="push of x", retry_policy=pol, sleep=sleep, clock=lambda: now[0])
    # Every wait is the 7 s asked for; no attempt starts past the 60 s budget: 8 waits, 9 attempts.
    assert slept == [7.0] * 8 and "after 9 attempts" in str(exc.value) and "HTTP 429" in str(exc.value)

    def not_found():
        calls.append(1)
        response = httpx2.Response(404, request=httpx2.Request("GET", "http://hub/x"))
        raise httpx2.HTTPStatusError("404", request=response.request, response=response)

    calls.clear()
    with pytest.raises(httpx2.HTTPStatusError):
        retry.run(not_found, what="x", retry_policy=pol, sleep=sleep)
    assert len(calls) == 1  # not transient: no retry


def test_request_layer_retries_only_idempotent_requests(monkeypatch):
    """The transport: reads are retried (and get a timeout), writes go through exactly once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.test")
    seen: list[tuple[str, str, dict]] = []
    answers = {"GET": [429, 503, 200], "POST": [503, 200]}

    def handler(request):
        seen.append((request.method, request.url.path, dict(request.extensions["timeout"])))
        if request.url.path == "/api/datasets/a/b" and request.method == "GET" and len(seen) == 1:
            raise httpx2.ConnectError("refused", request=request)
        status = answers[request.method].pop(0)
        return httpx2.Response(status, headers={"Retry-After": "2"} if status == 429 else {})

    slept: list[float] = []
    transport = retry.RetryingTransport(httpx2.MockTransport(handler), lambda: FAST, sleep=slept.append)
    client = httpx2.Client(transport=transport, timeout=None)
    assert client.get("http://hub.test/api/datasets/a/b").status_code == 200
    assert len(seen) == 4 and slept[1] >= 2  # ConnectError, 429 (Retry-After 2), 503, then 200
    assert all(t["read"] == FAST.timeout_s for _, _, t in seen)  # `timeout=None` no longer means forever

    seen.clear()
    assert client.post("http://hub.test/api/datasets/a/b/commit/main", content=b"x").status_code == 503
    assert len(seen) == 1  # a commit may have landed: never re-sent by this layer
    assert client.post("http://hub.test/api/datasets/a/b/preupload/main", content=b"{}").status_code == 200
    answers["GET"] = [503]
    assert client.get("http://elsewhere.test/info").status_code == 503  # not the Hub: untouched


# ------------------------------------------------------------------------------ policy and settings


def test_policy_from_env(monkeypatch):
    monkeypatch.delenv("ETOKIT_HUB_RETRY_SECONDS", raising=False)
    monkeypatch.setenv("ETOKIT_HUB_TIMEOUT", "")  # empty: the default
    assert retry.RetryPolicy.from_env() == retry.RetryPolicy()
    monkeypatch.setenv("ETOKIT_HUB_RETRY_SECONDS", "20")
    monkeypatch.setenv("ETOKIT_HUB_TIMEOUT", "2.5")
    pol = retry.RetryPolicy.from_env()
    # One request never retries for longer than its whole operation may.
    assert (pol.total_s, pol.request_s, pol.timeout_s) == (20.0, 20.0, 2.5)
    monkeypatch.setenv("ETOKIT_HUB_RETRY_SECONDS", "600")
    assert retry.RetryPolicy.from_env().request_s == retry.RetryPolicy.request_s
    for raw, message in (
        ("soon", "expected a number of seconds"),
        ("0", "must be positive"),
        ("-3", "must be positive"),
    ):
        monkeypatch.setenv("ETOKIT_HUB_TIMEOUT", raw)
        with pytest.raises(EtokitError, match=f"^ETOKIT_HUB_TIMEOUT='{raw}': {message}$"):
            retry.RetryPolicy.from_env()


class _Edge:
    """An rng whose uniform(a, b) is always a (low) or b (high): the two ends of the jitter."""

    def __init__(self, high: bool):
        self.high = high

    def uniform(self, a, b):
        return b if self.high else a


def test_backoff_doubles_up_to_the_cap_with_half_of_it_jittered():
    pol = retry.RetryPolicy(base_s=0.5, cap_s=10.0)
    full = [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [pol.backoff(a, _Edge(True)) for a in range(1, 8)] == full
    assert [pol.backoff(a, _Edge(False)) for a in range(1, 8)] == [d / 2 for d in full]
    import random

    draws = [pol.backoff(3, random.Random(seed)) for seed in range(50)]
    assert all(1.0 <= d <= 2.0 for d in draws) and len(set(draws)) == 50  # spread, within the bounds


def test_configure_sets_the_policy_until_reset(monkeypatch):
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.setenv("ETOKIT_HUB_RETRY_SECONDS", "42")
    original_factory, original_policy = hf_http._GLOBAL_CLIENT_FACTORY, retry._policy
    try:
        set_client_factory(hf_http.default_client_factory)
        retry.configure(FAST)
        assert retry.policy() is FAST
        assert getattr(hf_http._GLOBAL_CLIENT_FACTORY, "etokit", False)  # re-installed
        retry.configure(None)
        assert retry.policy() == retry.RetryPolicy.from_env() and retry.policy().total_s == 42
    finally:
        retry._policy = original_policy
        set_client_factory(original_factory)


# ------------------------------------------------------------------------------ classifying failures


def _status_error(status: int, headers: dict | None = None, url: str = "http://hub/x") -> httpx2.HTTPStatusError:
    request = httpx2.Request("GET", url)
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return httpx2.HTTPStatusError(f"{status} for {url}", request=request, response=response)


def test_is_transient_and_status_of():
    from huggingface_hub.errors import LocalEntryNotFoundError

    for status in (408, 412, 429, 500, 502, 503, 504):
        assert retry.is_transient(_status_error(status)), status
    for status in (400, 401, 403, 404, 409, 413, 422):
        assert not retry.is_transient(_status_error(status)), status
    assert retry.status_of(_status_error(503)) == 503 and retry.status_of(ValueError("x")) is None
    request = httpx2.Request("GET", "http://hub/x")
    for exc in (
        retry.Transient("moved"),
        httpx2.ConnectError("refused", request=request),
        httpx2.ReadTimeout("slow", request=request),
        ConnectionResetError(),
        TimeoutError(),
    ):
        assert retry.is_transient(exc), exc
    assert not retry.is_transient(ValueError("bad")) and not retry.is_transient(KeyError("k"))

    def offline(cause):
        try:
            raise LocalEntryNotFoundError("cannot reach the Hub and not cached") from cause
        except LocalEntryNotFoundError as e:
            return e

    # "Not cached and the Hub is unreachable": retried if the Hub was down, not if the request was bad.
    assert retry.is_transient(offline(None))
    assert retry.is_transient(offline(httpx2.ConnectError("refused", request=request)))
    assert not retry.is_transient(offline(_status_error(404)))


def test_retry_after_in_seconds_or_as_a_date(monkeypatch):
    from types import SimpleNamespace

    def of(value):
        return retry.retry_after(httpx2.Response(503, headers={} if value is None else {"Retry-After": value}))

    assert of("7") == 7.0 and of(" 12 ") == 12.0
    assert of(None) is None and of("") is None and of("soon") is None and of("1.5") is None
    assert retry.retry_after(None) is None
    date = "Wed, 21 Oct 2015 07:28:00 GMT"  # 1445412480 in Unix time
    monkeypatch.setattr(retry, "time", SimpleNamespace(time=lambda: 1445412480 - 90))
    assert of(date) == 90.0
    monkeypatch.setattr(retry, "time", SimpleNamespace(time=lambda: 1445412480 + 90))
    assert of(date) == 0.0  # already past: no wait


def test_describe_is_one_line_without_query_strings():
    err = _status_error(403, url="https://hub.test/upload?X-Amz-Signature=SECRET&x=1")
    err.args = ("403 Forbidden for url: https://hub.test/upload?X-Amz-Signature=SECRET&x=1\nmore detail",)
    assert retry.describe(err) == "HTTP 403: 403 Forbidden for url: https://hub.test/upload"
    assert retry.describe(ConnectionError("reset\n  by   peer")) == "ConnectionError: reset by peer"
    assert retry.describe(TimeoutError()) == "TimeoutError: TimeoutError"
    assert len(retry.describe(ValueError("x" * 1000))) == 300


# ------------------------------------------------------------------------------ the operation layer


class FakeTime:
    """monotonic() and sleep() of a clock that only moves when slept on (or moved by hand). It starts
    at 100: a real monotonic clock is never 0, which the request layer takes for "no failure yet"."""

    START = 100.0

    def __init__(self):
        self.now, self.slept = self.START, []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def test_the_budget_starts_at_the_first_failure():
    """A long, healthy upload is never cut short: 1000 s of work, then a failure, with a 60 s budget."""
    t = FakeTime()
    calls = []

    def op():
        calls.append(t.now)
        if len(calls) == 1:
            t.now += 1000
            raise retry.Transient("branch moved")
        return "ok"

    pol = retry.RetryPolicy(total_s=60, base_s=1, cap_s=1)
    assert retry.run(op, what="x", retry_policy=pol, sleep=t.sleep, clock=t.monotonic) == "ok"
    assert len(calls) == 2


def test_a_step_inside_an_operation_shares_its_budget_and_lets_it_report(monkeypatch):
    monkeypatch.setattr(retry, "random", _Edge(True))  # no jitter: every wait is the full 1 s
    t = FakeTime()
    pol = retry.RetryPolicy(total_s=10, base_s=1, cap_s=1)
    inner_calls = []

    def step():
        inner_calls.append(t.now)
        raise retry.Transient("not there yet")

    def operation():
        return retry.run(step, what="verify step", retry_policy=pol, sleep=t.sleep, clock=t.monotonic)

    with pytest.raises(
        ServiceUnavailable,
        match=r"^push of m: the Hub still failed after 11 attempts in 9s "
        r"\(last: Transient: not there yet\)",
    ) as e:
        retry.run(operation, what="push of m", retry_policy=pol, sleep=t.sleep, clock=t.monotonic)
    assert isinstance(e.value.__cause__, retry.Transient) and "verify step" not in str(e.value)
    # The step stopped when the shared 10 s were spent (its next try would start at 10 s), and the
    # operation did not start it again: 1 operation attempt + 10 step attempts.
    assert inner_calls == [t.START + i for i in range(10)] and t.now == t.START + 9


# ------------------------------------------------------------------------------ the request layer


@pytest.fixture
def hub_endpoint(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://hub.test")
    return "http://hub.test"


def _client(handler, pol, clock: FakeTime):
    return httpx2.Client(
        transport=retry.RetryingTransport(httpx2.MockTransport(handler), lambda: pol, clock.sleep), timeout=None
    )


def test_which_requests_are_replayed(hub_endpoint, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://datasets-hub.test")  # datasets pointed elsewhere
    t = FakeTime()
    monkeypatch.setattr(retry, "time", t)
    seen = []

    def handler(request):
        seen.append((request.method, request.url.host, request.url.path))
        return httpx2.Response(503 if len(seen) % 2 else 200)  # fails once, then answers

    client = _client(handler, FAST, t)
    replayed = [
        ("HEAD", "http://hub.test/api/models/a/b"),
        ("OPTIONS", "http://hub.test/x"),
        ("POST", "http://hub.test/api/models/a/b/paths-info/main"),
        ("POST", "http://hub.test/a/b.git/info/lfs/objects/batch"),
        ("POST", "http://hub.test/api/validate-yaml"),
        ("GET", "http://datasets-hub.test/api/datasets/a/b"),
    ]
    for method, url in replayed:
        seen.clear()
        assert client.request(method, url, content=b"{}" if method == "POST" else None).status_code == 200, url
        assert len(seen) == 2, url
    once = [
        ("POST", "http://hub.test/api/models/a/b/commit/main"),
        ("PUT", "http://hub.test/api/repos/create"),
        ("DELETE", "http://hub.test/api/models/a/b/tag/v1"),
        ("GET", "http://other.test/api/models/a/b"),
    ]
    for method, url in once:
        seen.clear()
        assert client.request(method, url).status_code == 503, url
        assert len(seen) == 1, url
    seen.clear()
    # A body that cannot be sent twice (a stream) goes once, even to a read-only route.
    assert client.post("http://hub.test/api/models/a/b/preupload/main", content=iter([b"{}"])).status_code == 503
    assert len(seen) == 1


def test_a_request_is_retried_for_request_s_at_most(hub_endpoint, monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(retry, "time", t)
    seen = []

    def handler(request):
        seen.append(t.now)
        return httpx2.Response(503)

    assert _client(handler, FAST, t).get("http://hub.test/api/models/a/b").status_code == 503  # the last answer
    assert seen[-1] < t.START + FAST.request_s <= seen[-1] + FAST.cap_s and len(seen) > 10


def test_a_retry_after_beyond_the_limit_is_left_to_the_operation(hub_endpoint, monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(retry, "time", t)
    seen = []

    def handler(request):
        seen.append(request)
        return httpx2.Response(429, headers={"Retry-After": str(int(FAST.max_retry_after_s) + 1)})

    assert _client(handler, FAST, t).get("http://hub.test/api/models/a/b").status_code == 429
    assert len(seen) == 1 and t.slept == []


def test_past_the_operation_budget_a_failed_request_ends_the_operation(hub_endpoint, monkeypatch):
    """Reads and writes alike: once the budget is spent, a failure is BudgetSpent, which the retries
    of huggingface_hub's own (http_backoff, here a loop re-sending on 503) do not catch, and the
    operation fails at once, naming it."""
    t = FakeTime()
    monkeypatch.setattr(retry, "time", t)
    pol = retry.RetryPolicy(total_s=10, request_s=60, base_s=1, cap_s=1)
    seen = []

    def handler(request):
        seen.append((request.method, t.now))
        return httpx2.Response(503)

    client = _client(handler, pol, t)
    for method, url in (
        ("GET", "http://hub.test/api/models/a/b"),
        ("POST", "http://hub.test/api/models/a/b/commit/main"),
    ):
        seen.clear()
        t.now = t.START

        def op():
            for _ in range(100):
                if client.request(method, url).status_code != 503:
                    return
                t.sleep(1)

        with pytest.raises(
            ServiceUnavailable,
            match=re.escape(
                f"(last: BudgetSpent: HTTP 503 ({method} {url[len('http://hub.test') :]}); retry budget spent)"
            ),
        ):
            retry.run(op, what="push", retry_policy=pol, sleep=t.sleep, clock=t.monotonic)
        assert seen[-1][1] <= t.START + pol.total_s and t.now <= t.START + pol.total_s + pol.cap_s, method
