"""`etokit hub ...`: the embedded Hub-compatible server, for offline use and tests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from etokit.cli._errors import user_errors
from etokit.errors import EtokitError

PortOpt = Annotated[int, typer.Option("--port", "-p", help="Port to listen on; 0 picks a free one.")]
DataDirOpt = Annotated[
    Path, typer.Option("--data-dir", help="Directory holding repos, commits and blobs (created if missing).")
]
HostOpt = Annotated[str, typer.Option("--host", help="Interface to bind. Keep 127.0.0.1 unless you set --token.")]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", help="If set, every request must carry `Authorization: Bearer TOKEN`.", show_default=False),
]
FaultRateOpt = Annotated[
    float,
    typer.Option(
        "--fault-rate",
        min=0.0,
        max=1.0,
        help="Put a fault-injecting proxy in front: this share of requests fail (5xx, 429, resets, stalls).",
        rich_help_panel="Fault injection (testing)",
    ),
]
FaultSeedOpt = Annotated[
    int, typer.Option("--fault-seed", help="Seed of the proxy's faults.", rich_help_panel="Fault injection (testing)")
]
FaultsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--faults",
        help="Comma-separated fault kinds to draw from (default: all): "
        "500,502,503,429,reset,reset_after,stall,stall_after.",
        show_default=False,
        rich_help_panel="Fault injection (testing)",
    ),
]
StallOpt = Annotated[
    float,
    typer.Option(
        "--stall-seconds",
        min=0.0,
        help="How long a stalled request hangs.",
        rich_help_panel="Fault injection (testing)",
    ),
]

hub_app = typer.Typer(
    name="hub",
    help="Run a local Hugging Face Hub-compatible server (no internet needed).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

_SERVE_EPILOG = """\
[bold]Examples[/bold]

  $ etokit hub serve --port 8765 --data-dir .hub

  $ etokit hub serve --port 0 --data-dir /tmp/hub --token hf_local_secret

  $ etokit hub serve --port 8765 --data-dir .hub --fault-rate 0.3

Then, in the shell that runs huggingface_hub / datasets / transformers:

  $ export HF_ENDPOINT=http://127.0.0.1:8765

  $ export HF_HUB_DISABLE_XET=1
"""


@hub_app.command("serve", epilog=_SERVE_EPILOG)
@user_errors
def serve(
    data_dir: DataDirOpt,
    port: PortOpt = 0,
    host: HostOpt = "127.0.0.1",
    token: TokenOpt = None,
    fault_rate: FaultRateOpt = 0.0,
    fault_seed: FaultSeedOpt = 0,
    faults: FaultsOpt = None,
    stall_seconds: StallOpt = 120.0,
) -> None:
    """Serve model and dataset repos from DATA_DIR until Ctrl-C."""
    from etokit.hub.fault_proxy import FAULTS, FaultProxy
    from etokit.hub.server import HubServer

    if not 0 <= port <= 65535:
        raise EtokitError(f"--port {port}: must be between 0 and 65535")
    if data_dir.exists() and not data_dir.is_dir():
        raise EtokitError(f"--data-dir {data_dir}: exists and is not a directory")
    kinds = tuple(k.strip() for k in faults.split(",") if k.strip()) if faults else FAULTS
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown or not kinds:
        raise EtokitError(
            f"--faults {faults!r}: unknown kind {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAULTS)}"
        )
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: --host {host} without --token: anyone who can reach this port can read and write every repo",
            err=True,
        )
    try:
        # Behind a fault proxy, the Hub itself takes a free port and the proxy the one asked for.
        server = HubServer(data_dir, host=host, port=0 if fault_rate else port, token=token)
    except OSError as e:
        raise EtokitError(f"--data-dir {data_dir}: cannot create the store ({e.strerror or e})") from None
    proxy = None
    try:  # everything inside: a Ctrl-C at any point stops the server cleanly
        try:
            server.start()
            if fault_rate:
                proxy = FaultProxy(
                    server.endpoint,
                    rate=fault_rate,
                    seed=fault_seed,
                    faults=kinds,
                    stall_s=stall_seconds,
                    host=host,
                    port=port,
                ).start()
        except OSError as e:
            raise EtokitError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
        endpoint = proxy.endpoint if proxy else server.endpoint
        typer.echo(f"etokit hub serving {data_dir} at {endpoint}")
        if proxy:
            typer.echo(
                f"fault injection: {fault_rate:.0%} of requests fail ({', '.join(kinds)}; seed {fault_seed}); "
                f"the Hub without faults is at {server.endpoint}"
            )
        typer.echo("Point Hugging Face clients at it with:")
        typer.echo(f"  export HF_ENDPOINT={endpoint}")
        typer.echo("  export HF_HUB_DISABLE_XET=1")
        if token:
            typer.echo("  export HF_TOKEN=<the --token value>")
        typer.echo("Press Ctrl-C to stop.")
        threading.Event().wait()
    except KeyboardInterrupt:
        typer.echo("stopped.")
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


def register(app: typer.Typer) -> None:
    app.add_typer(hub_app, name="hub")
