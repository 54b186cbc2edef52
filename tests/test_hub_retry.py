"""etokit.hub.retry on its own: the operation layer on a fake clock, the request layer on a mock
transport, and the contract with huggingface_hub that the request layer rests on. The same
retries under real faults, through a proxy in front of the embedded Hub: tests/test_faults_hub.py."""

from __future__ import annotations

import configparser
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
        assert client._mounts and all(isinstance(t, retry.RetryingTransport) for t in client._mounts.values()
                                      if t is not None)
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
