"""The consoles every command prints through. soft_wrap: rich must not break lines at the
terminal width (80 columns when piped), or paths, repo ids and copy-paste snippets get split."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_unwrapped(renderable, on: Console = console) -> None:
    """Print a table at its natural width even past the terminal's (80 columns when piped): a cell
    such as ``12.5 [8.1, 17.0]`` broken over lines is unreadable, a long line is not."""
    from rich.measure import Measurement

    needed = Measurement.get(on, on.options.update_width(10_000), renderable).maximum
    if needed <= on.width:
        on.print(renderable)
        return
    wide = Console(
        file=on.file,
        width=needed,
        highlight=False,
        soft_wrap=True,
        color_system=on.color_system,
        force_terminal=on.is_terminal,
    )
    wide.print(renderable)
