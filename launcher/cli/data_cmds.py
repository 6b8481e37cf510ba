"""`launcher data prepare`: tokenize a recipe's data once into the shared cache."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.cli.common import Overrides, console


def data_prepare(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (stdout holds only it).")] = False,
) -> None:
    """Prepare (tokenize, pack, write memory-mapped files) the recipe's data into data.cache_dir.

    Each source is prepared once per fingerprint (its files' sizes and mtimes or hub revision,
    the tokenizer, the format and sequence settings); a second prepare is a cache hit.
    `launcher run` prepares whatever is missing itself, with the same code: run this on a CPU
    node first to keep GPU nodes from tokenizing, with data.cache_dir on a shared filesystem.

    Example: launcher data prepare recipes/examples/tiny-mix.yaml

    Example: launcher data prepare recipes/pretrain/llama-1b-pretrain.yaml data.cache_dir=/shared/launcher-data --json
    """
    from launcher.data import build_tokenizer
    from launcher.data.prepare import prepare_datasets
    from launcher.pretrained import go_offline_if_unreachable, resolve_local_paths
    from launcher.recipe import load_recipe

    r = load_recipe(recipe, overrides or [])
    resolve_local_paths(r)
    out = Console(stderr=True, soft_wrap=True) if as_json else console
    note = go_offline_if_unreachable(r)
    if note:
        out.print(f"note: {note}", highlight=False, markup=False)
    tokenizer = build_tokenizer(r.tokenizer, r.model.name_or_path, trust_remote_code=r.model.trust_remote_code)
    start = time.monotonic()
    with _ProgressDisplay(out) as display:
        splits = prepare_datasets(r, tokenizer, progress=display.hear)
    summary = _summary(splits.stats, display.sources, time.monotonic() - start)
    if as_json:
        print(json.dumps(summary))
        return
    _print_summary(summary)


class _ProgressDisplay:
    """A rich progress bar per source being prepared: rows, tokens, tokens/s."""

    def __init__(self, out: Console) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.out = out
        self.sources: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, Any] = {}
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
            TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]:,.0f} tokens/s"),
            TimeElapsedColumn(), console=out, transient=False,
        )  # fmt: skip

    def __enter__(self) -> _ProgressDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def hear(self, event: dict[str, Any]) -> None:
        source = event["source"]
        if event["event"] in ("cached", "done"):
            self.sources[source] = {**event, "cache_hit": event["event"] == "cached"}
            if event["event"] == "cached":
                self.out.print(f"{escape(source)}: prepared earlier ({escape(event['path'])})", highlight=False)
            return
        rate = event["tokens"] / max(event["seconds"], 1e-9)
        if source not in self.tasks:
            self.tasks[source] = self.progress.add_task(source, total=event["total_rows"], tokens=0, rate=0.0)
        task = self.tasks[source]
        self.progress.update(task, total=max(event["total_rows"], 1), completed=event["rows"],
                             tokens=event["tokens"], rate=rate)


def _summary(stats: dict[str, Any], sources: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    per_source = []
    for s in stats.get("prepared", []):
        ev = sources.get(s["source"], {})
        per_source.append({
            "source": s["source"], "path": s["path"], "cache_hit": s["cache_hit"],
            "rows": ev.get("rows"), "tokens": ev.get("tokens"), "bytes": ev.get("bytes"),
            "skipped_by_reason": ev.get("skipped_by_reason", {}), "seconds": ev.get("seconds"),
        })  # fmt: skip
    return {
        "rows": stats["rows"], "skipped_malformed": stats["skipped_malformed"],
        "skipped_by_reason": stats["skipped_by_reason"], "truncated": stats["truncated"],
        "dropped_no_labels": stats["dropped_no_labels"], "train_examples": stats["train_examples"],
        "eval_examples": stats["eval_examples"], "train_tokens": stats["train_tokens"],
        "tokens": sum(p["tokens"] or 0 for p in per_source), "bytes": sum(p["bytes"] or 0 for p in per_source),
        "seconds": round(seconds, 3), "sources": per_source,
    }  # fmt: skip


def _print_summary(s: dict[str, Any]) -> None:
    table = Table(show_header=True, header_style="bold")
    for col in ("source", "rows", "tokens", "MB", "seconds", "cache"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for p in s["sources"]:
        table.add_row(escape(p["source"]), f"{p['rows'] or 0:,}", f"{p['tokens'] or 0:,}",
                      f"{(p['bytes'] or 0) / 1e6:,.1f}", f"{p['seconds'] or 0:.1f}",
                      "hit" if p["cache_hit"] else "prepared")
    console.print(table)
    console.print(
        f"[bold green]prepared[/] {s['rows']:,} rows: {s['train_examples']:,} training and {s['eval_examples']:,} "
        f"eval examples, {s['tokens']:,} tokens, {s['bytes'] / 1e6:,.1f} MB in {s['seconds']:.1f} s; "
        f"skipped {s['skipped_malformed']}, truncated {s['truncated']}", highlight=False,
    )  # fmt: skip
    for reason, n in sorted(s["skipped_by_reason"].items(), key=lambda kv: -kv[1]):
        console.print(f"  skipped {n:,}: {escape(reason)}", highlight=False)
    for p in s["sources"][:1]:
        console.print(f"cache: {escape(str(Path(p['path']).parent))}", highlight=False)
