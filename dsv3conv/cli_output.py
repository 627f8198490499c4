"""What the command line prints: tables for terminals and logs, JSON for machines (stdout); errors go to stderr."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dsv3conv.errors import counted, printable

try:
    from typer._click.core import augment_usage_errors  # Typer >= 0.26 vendors Click
except ImportError:
    from click.core import augment_usage_errors

# Off a terminal (a CI log, a file, a pipe) rich would wrap tables at 80 columns: give them room, unless
# COLUMNS says otherwise.
WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
MAX_PROBLEMS_SHOWN = 50  # inspect's table output; --json lists every problem


class _Console(Console):
    """Strings print escaped (`printable`): a name holding a newline, an escape sequence or bytes that are not
    UTF-8 stays on its line and cannot break the output. A rich `Text` prints as it is."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)

    def on_broken_pipe(self) -> None:
        """The stream's reader went away (`| head`): the rest goes nowhere and the run ends with its own exit
        code (rich would exit 1, failing a finished conversion under `set -o pipefail`)."""
        self.quiet = True
        reader_gone(self.file)


out = _Console(highlight=False, soft_wrap=True, width=WIDTH)
err = _Console(stderr=True, highlight=False, soft_wrap=True, width=WIDTH)


class Command(typer.core.TyperCommand):
    """A subcommand. A usage error its option parser finds (`dequant --mtp` given no value) names the
    subcommand's help, like the others: Click's `augment_usage_errors` gives the error the command's context.
    A repeated path argument reads `REPORT... <path>` in the help, as a single one reads `SRC <path>`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "type_descriptor", None) is not None and param.type_descriptor.annotation == list[Path]:
                param.__class__ = _PathsArgument

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        with augment_usage_errors(ctx), help_reader_gone(ctx):
            return super().parse_args(ctx, args)


@contextmanager
def help_reader_gone(ctx):
    """--help written to a stdout whose reader has gone (`dsv3conv dequant --help | head`): the rest is dropped
    and the help exits 0 as it does otherwise (Click would exit 1). Only the help writes while options parse."""
    try:
        yield
    except BrokenPipeError:
        reader_gone(sys.stdout)
        ctx.exit(0)


class _PathsArgument(typer.core.TyperArgument):
    """One or more paths, shown as `NAME... <path>` where Typer writes `NAME <list[Path]>`."""

    def _rich_display_name(self) -> str:
        return f"{self.display_name_raw}..."

    def display_type(self, ctx) -> str:
        return f"<{self.type_descriptor.path_type}>"


def plain(text: object) -> Text:
    """A name or value for a table cell or title: escaped, and never read as rich markup."""
    return Text(printable(str(text)))


def reader_gone(stream) -> None:
    """Point `stream` at /dev/null once its reader has gone, so that later writes and the interpreter's final
    flush succeed quietly (the recipe of Python's `signal` documentation, note on SIGPIPE)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not a file (a test's capture): nothing will flush it at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def flush_output() -> None:
    """Flush stdout and stderr before exit; a stream whose reader has gone is discarded, not an error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            reader_gone(stream)


def print_json(obj: dict) -> None:
    try:
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone(sys.stdout)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def print_inspect(r: dict, json_out: bool = False) -> None:
    """inspect's report: JSON, or a table of what the checkpoint holds, its parameters and its problems."""
    if json_out:
        print_json(r)
        return
    t = Table(title=Text(printable(r["path"]), style="bold"), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model type", plain(r["model_type"]))
    t.add_row("architectures", plain(", ".join(r["architectures"] or []) or "-"))
    t.add_row("layers", f"{r['num_hidden_layers']} main + {r['num_nextn_predict_layers'] or 0} MTP (config); {r['layers']} found")
    v4 = r["layout"].get("mtp_modules") is not None  # DeepSeek-V4 names: MTP under mtp.*, no layer ids
    if not v4:
        t.add_row("MTP layer ids", ", ".join(map(str, r["mtp_layers"])) or "none")
    q = r["quantization"]
    t.add_row("quantization", plain(json.dumps(q, separators=(", ", ": ")) if q else "none"))
    t.add_row("shards", f"{r['shards']} ({fmt_bytes(r['tensor_bytes'])} of tensors; index total_size {r['total_size']})")
    t.add_row("tensors", f"{r['tensors']:,}")
    t.add_row("dtypes", "  ".join(f"{k} {v:,}" for k, v in r["dtypes"].items()))
    f = r["fp8"]
    t.add_row("FP8 weights", f"{f['weights_with_scale']:,} with scale, {f['weights_without_scale']:,} without; "
              f"{counted(f['orphan_scales'], 'orphan scale')}")
    t.add_row("formats", "\n".join(f"{k}: {v:,}" for k, v in r["formats"].items()) or "-")
    lay = r["layout"]
    if v4:
        kind = {"mtp": "MTP module", "dspark": "DSpark drafter"}.get(lay["mtp_kind"], "none")
        t.add_row("mtp.*", f"{kind}: modules {lay['mtp_modules']}, {counted(lay['mtp_tensors'], 'tensor')}" if lay["mtp_kind"] else "none")
    out.print(t)
    p = r["params"]
    pt = Table(title="parameters (scales excluded)", title_justify="left")
    pt.add_column("figure")
    pt.add_column("count", justify="right")
    pt.add_column("")
    rows = [
        ("main model", p["main"], "every tensor outside the MTP layers"),
        ("  embedding", p["embedding"], "embed" if v4 else "model.embed_tokens"),
        ("  head", p["head"], "head" if v4 else "lm_head"),
        ("  activated per token", p["main_activated"], "incl. head, excl. embedding; top-k routed experts"),
        ("  activated incl. embedding", p["main_activated"] + p["embedding"], ""),
        ("MTP, all stored", p["mtp"], "incl. its copies of embedding and head"),
        ("MTP unique", p["mtp_unique"], "without those copies"),
        ("MTP activated per token", p["mtp_activated"], ""),
        ("scale elements", p["scales"], "not parameters"),
    ]
    for name, n, note in rows:
        pt.add_row(name, f"{n:,} ({n / 1e9:.3f}B)", note)
    out.print(pt)
    if r["problems"]:
        out.print(f"[bold red]{counted(len(r['problems']), 'problem')}[/]")
        for line in r["problems"][:MAX_PROBLEMS_SHOWN]:
            out.print(f"  - {line}", markup=False)
        if len(r["problems"]) > MAX_PROBLEMS_SHOWN:
            out.print(f"  ... and {counted(len(r['problems']) - MAX_PROBLEMS_SHOWN, 'more problem')} (--json lists them all)")
    else:
        out.print("[green]no problems found[/]")


def print_result(result: dict, json_out: bool, dry_run: bool) -> None:
    if json_out:
        print_json(result)
        return
    if dry_run:
        out.print(f"[bold]plan[/] {escape(printable(result['source']))} -> {escape(printable(result['output']))}")
        for f in result["files"]:
            out.print(f"  {f['name']}: {counted(f['tensors'], 'tensor')} ({f['converted']} converted), {fmt_bytes(f['bytes'])}"
                      + (f" (copy of {f['copy_of']})" if f.get("copy_of") else ""), markup=False)
        out.print(f"  tensors: {result['tensors_converted']} converted, {result['tensors_copied']} copied, "
                  f"{result['tensors_dropped']} dropped")
        out.print(f"  bytes: {fmt_bytes(result['bytes_in'])} read, {fmt_bytes(result['bytes_out'])} written")
        out.print(f"  disk: {fmt_bytes(result['bytes_needed'])} needed in the destination, "
                  f"{fmt_bytes(result['bytes_free'])} free there")
        for c in result["config_changes"]:
            out.print(f"  config.json: {c}", markup=False)
        out.print(f"  other files copied: {', '.join(result['extra_files']) or 'none'}", markup=False)
        out.print("dry run: nothing written")
        return
    if "part" in result:  # this part's own shards and tensors, not the whole plan's
        done = "index and config written" if result["finalized"] else (
            f"{counted(len(result['waiting_for']), 'shard')} still to come from other parts; the last part writes index and config")
        out.print(
            f"wrote part {result['part']} of {result['output']}: {len(result['part_shards'])} of {counted(result['shards'], 'shard')} "
            f"({result['shards_skipped']} already complete), {counted(result['part_tensors_converted'], 'tensor')} "
            f"converted, {result['part_tensors_copied']} copied, {fmt_bytes(result['bytes_written'])} in "
            f"{result['seconds']:.1f} s on {result['device']}; {done}",
            markup=False,
        )
        return
    out.print(
        f"wrote {result['output']}: {counted(result['shards'], 'shard')} ({result['shards_skipped']} already complete), "
        f"{counted(result['tensors_converted'], 'tensor')} converted, {result['tensors_copied']} copied, "
        f"{result['tensors_dropped']} dropped, {fmt_bytes(result['bytes_written'])} in {result['seconds']:.1f} s "
        f"on {result['device']}",
        markup=False,
    )


def print_split(result: dict, mtp_layout: str, json_out: bool, dry_run: bool) -> None:
    """split-mtp's summary: one line (or plan) for each output written, the main model and the MTP draft."""
    if json_out:
        print_json(result)
        return
    for key, what in (("main", "main model"), ("mtp", f"MTP draft ({mtp_layout} layout)")):
        r = result[key]
        if r is None:
            continue
        if dry_run:
            out.print(Text(what, style="bold"))
            print_result(r, False, True)
            continue
        if "part" in r:  # this part's own shards and tensors, not the whole plan's
            shards = f"part {r['part']}: {len(r['part_shards'])} of {counted(r['shards'], 'shard')}"
            tensors = r["part_tensors_copied"]
        else:
            shards, tensors = counted(r["shards"], "shard"), r["tensors_copied"]
        out.print(
            f"wrote {what} {r['output']}: {shards} ({r['shards_copied_whole']} copied whole, "
            f"{r['shards_skipped']} already complete), {counted(tensors, 'tensor')}, "
            f"{r['tensors_dropped']} left out, {fmt_bytes(r['bytes_written'])} in {r['seconds']:.1f} s",
            markup=False,
        )


def print_verify(report: dict, title: str, json_out: bool) -> None:
    """The report of verify (or of its combined parts): JSON, or a table of checks and a verdict."""
    if json_out:
        print_json(report)
    else:
        t = Table(title=Text(printable(title), style="bold"), title_justify="left")
        t.add_column("check", style="bold", no_wrap=True)
        t.add_column("result", no_wrap=True)
        t.add_column("detail", overflow="fold")
        for c in report["checks"]:
            t.add_row(c["name"], "[green]pass[/]" if c["ok"] else "[bold red]FAIL[/]", plain(c["detail"]))
        out.print(t)
        failed = [c["name"] for c in report["checks"] if not c["ok"]]
        if report["mismatches"]:
            differ = counted(len(report["mismatches"]), "tensor differs", "tensors differ")
            out.print(f"[bold red]{differ} from the source:[/]")
            for name in report["mismatches"]:
                out.print(f"  {name}", markup=False)
        if failed:
            out.print(f"[bold red]{len(failed)} of {len(report['checks'])} checks failed:[/] {', '.join(failed)}")
        else:
            out.print(f"[green]all {len(report['checks'])} checks passed[/]")
