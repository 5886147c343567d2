"""``streamrec catalogue``: catalogue changes that reach serving without a reload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from streamrec.paths import resolve_data_dir

app = typer.Typer(help="Catalogue changes (new items, categories, promoted, flagged) for the serving replicas.")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default: $STREAMREC_HOME or ./.streamrec).")
]


@app.command()
def sync(
    data_dir: DataDirOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count the changes; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """After an ingest: send every item change serving does not know yet to the replicas.

    Compares the ingested items table with what serving knows (the last feature build plus
    earlier catalogue changes) and appends the differences to the catalogue log; every replica
    on the data directory applies them within seconds (flagged items at their next answer).
    """
    from streamrec.data.catalogue import sync_from_store

    out = sync_from_store(resolve_data_dir(data_dir), dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(out))
        return
    verb = "would send" if dry_run else "sent"
    typer.echo(
        f"{out['items']} ingested item(s); {verb} {out['changed']} change(s) ({out['new']} new to serving, "
        f"{len(out['flagged'])} newly flagged); the catalogue log holds {out['catalogue_lines']} line(s)"
    )
