"""`etokit init-model`: a tiny randomly initialized Llama agent with a tokenizer trained on your
trajectories, for smoke runs of the whole ETO loop without downloading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from etokit.cli._console import console

from etokit.cli._errors import user_errors
from etokit.errors import EtokitError


_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit init-model --corpus expert.jsonl --out models/tiny
  $ etokit init-model --corpus notes.txt --out models/small --size small --seed 1
"""

CorpusOpt = Annotated[
    Path,
    typer.Option(
        "--corpus", help="A text file, or an etokit trajectory .jsonl (its messages' text is used).", show_default=False
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder to save the model and tokenizer in.", show_default=False)]
SizeOpt = Annotated[str, typer.Option("--size", help="Model size: tiny (hidden 64, 2 layers) or small.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the weight initialization.")]


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EtokitError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EtokitError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def register(app: typer.Typer) -> None:
    @app.command("init-model", epilog=_EXAMPLES)
    @user_errors
    def init_model(
        corpus: CorpusOpt, out: OutOpt, size: SizeOpt = "tiny", seed: SeedOpt = 0, overwrite: OverwriteOpt = False
    ) -> None:
        """Build a tiny Llama model + SentencePiece tokenizer (with a chat template) from a corpus."""
        from etokit.models.init_model import SIZES, build_tiny_model, read_corpus

        if size not in SIZES:
            raise EtokitError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
        _check_out_dir(out, overwrite)
        texts = read_corpus(corpus)
        with console.status(f"Training a tokenizer on {len(texts)} texts and building a {size} model..."):
            model, tokenizer = build_tiny_model(texts, out, size=size, seed=seed)
        n_params = sum(p.numel() for p in model.parameters())
        console.print(f"[green]✓[/] {out}: LlamaForCausalLM, {n_params:,} parameters, vocabulary {len(tokenizer)}")
        console.print(f'  AutoModelForCausalLM.from_pretrained("{out}")', markup=False)

    app.add_typer(models_app)


# --- `etokit models ...` ----------------------------------------------------------------------

_IMPORT_GGUF_EXAMPLES = """
[bold]Examples[/bold]

  $ etokit models import-gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2

  $ etokit models import-gguf llama.Q8_0.gguf --out models/llama --dtype bfloat16 --overwrite

Then train or explore with [cyan]--model models/smollm2[/cyan], or load it with
[cyan]AutoModelForCausalLM.from_pretrained("models/smollm2")[/cyan].
"""

GgufPathArg = Annotated[
    Path,
    typer.Argument(
        help="A .gguf file of an architecture transformers can load (llama, qwen2, ...).", show_default=False
    ),
]
ImportOutOpt = Annotated[
    Path, typer.Option("--out", help="Folder to write (safetensors, config, tokenizer).", show_default=False)
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Weight dtype of the saved model: float32, bfloat16 or float16.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists and is not empty.")]

models_app = typer.Typer(
    name="models",
    help="Bring pretrained models into etokit (offline).",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@models_app.command("import-gguf", epilog=_IMPORT_GGUF_EXAMPLES)
@user_errors
def import_gguf_cmd(
    gguf_path: GgufPathArg, out: ImportOutOpt, dtype: DtypeOpt = "float32", overwrite: OverwriteOpt = False
) -> None:
    """Convert a GGUF checkpoint into a plain transformers model folder.

    Weights are dequantized and saved as safetensors with the tokenizer (fast, chat template kept) and generation config; the saved model must give the GGUF model's logits exactly.
    """
    from etokit.models.gguf import import_gguf

    with console.status("Importing...") as status:
        out_dir = import_gguf(
            gguf_path, out, dtype, overwrite=overwrite, progress=lambda msg: status.update(f"{msg}...")
        )
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    console.print(f"[green]✓[/] {out_dir}: logits match the GGUF model; {size / 1e6:,.1f} MB ({dtype})")
    console.print(f'  AutoModelForCausalLM.from_pretrained("{out_dir}")', markup=False)
