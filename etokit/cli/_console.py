"""The consoles every command prints through. soft_wrap: rich must not break lines at the
terminal width (80 columns when piped), or paths, repo ids and copy-paste snippets get split."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
