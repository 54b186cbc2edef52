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
HostOpt = Annotated[
    str, typer.Option("--host", help="Interface to bind. Keep 127.0.0.1 unless you set --token.")
]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", help="If set, every request must carry `Authorization: Bearer TOKEN`.", show_default=False),
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
) -> None:
    """Serve model and dataset repos from DATA_DIR until Ctrl-C."""
    from etokit.hub.server import HubServer

    if not 0 <= port <= 65535:
        raise EtokitError(f"--port {port}: must be between 0 and 65535")
    if data_dir.exists() and not data_dir.is_dir():
        raise EtokitError(f"--data-dir {data_dir}: exists and is not a directory")
    try:
        server = HubServer(data_dir, host=host, port=port, token=token)
    except OSError as e:
        raise EtokitError(f"--data-dir {data_dir}: cannot create the store ({e.strerror or e})") from None
    try:  # everything inside: a Ctrl-C at any point stops the server cleanly
        try:
            server.start()
        except OSError as e:
            raise EtokitError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
        typer.echo(f"etokit hub serving {data_dir} at {server.endpoint}")
        typer.echo("Point Hugging Face clients at it with:")
        typer.echo(f"  export HF_ENDPOINT={server.endpoint}")
        typer.echo("  export HF_HUB_DISABLE_XET=1")
        if token:
            typer.echo("  export HF_TOKEN=<the --token value>")
        typer.echo("Press Ctrl-C to stop.")
        threading.Event().wait()
    except KeyboardInterrupt:
        typer.echo("stopped.")
    finally:
        server.stop()


def register(app: typer.Typer) -> None:
    app.add_typer(hub_app, name="hub")
