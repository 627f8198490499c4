"""The `dsv3conv` command line: one function per subcommand, errors mapped to one line and an exit code.

Exit codes: 0 success; 1 a problem found in the data or a runtime failure; 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from dsv3conv import __version__
from dsv3conv.cli_output import (
    Command,
    err,
    help_reader_gone,
    out,
    print_inspect,
    print_result,
    print_split,
    print_verify,
    reader_gone,
)
from dsv3conv.errors import Dsv3Error, counted
from dsv3conv.profiling import process_age


class _Group(typer.core.TyperGroup):
    """The app's command group: a usage error Typer finds (a missing argument, an unknown option) is one line
    on stderr with exit code 2, like every other error."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            from typer._click.exceptions import NoArgsIsHelpError, UsageError  # Typer >= 0.26 vendors Click
        except ImportError:
            from click.exceptions import NoArgsIsHelpError, UsageError
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
            code = code if isinstance(code, int) else 0
        except NoArgsIsHelpError as exc:  # `dsv3conv` alone: the help, as a usage error
            try:
                exc.show()
            except BrokenPipeError:  # stderr's reader has gone: the exit code stays
                reader_gone(sys.stderr)
            code = exc.exit_code
        except UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "dsv3conv"
            err.print(f"dsv3conv: error: {exc.format_message()} (see `{where} --help`)", markup=False)
            code = 2
        except typer.Abort:
            err.print("dsv3conv: aborted", markup=False)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        with help_reader_gone(ctx):
            return super().parse_args(ctx, args)


app = typer.Typer(
    name="dsv3conv",
    cls=_Group,
    help="Convert DeepSeek-V3-style FP8 checkpoints: inspect, dequant, quant, split-mtp, verify, verify-combine, "
         "example. Exit codes: 0 success, 1 a problem in the data or a failed run, 2 a usage error, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"max_content_width": 120},
    rich_markup_mode=None,  # plain help: flags without value placeholders, readable in logs and pipes
)
_state = {"debug": False, "running": False}  # running: a command has begun (signals then clean up)
_STARTED = time.perf_counter() - max(0.0, process_age() or 0.0)  # when this process started


def _from_process_start(summary: dict | None, called: float) -> None:
    """A summary's `seconds` and `startup_seconds` count from the start of the process (the wall time the user
    waited), not from the library call."""
    for key in ("seconds", "startup_seconds"):
        if summary and key in summary:
            summary[key] = round(summary[key] + called - _STARTED, 3)


def _progress(quiet: bool, json_out: bool) -> bool:
    """Progress on stderr unless --quiet, or --json while stderr is no terminal (a log gets the JSON alone)."""
    return not (quiet or json_out and not err.is_terminal)


# Options shared by several subcommands, declared once.
# readable=False: the reader's own one-line error names an unreadable directory (Typer's check prints a panel).
CkptArg = Annotated[Path, typer.Argument(metavar="CKPT", help="Checkpoint directory (index + shards, or model.safetensors).",
                                         show_default=False, readable=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Finish an earlier run into DST: complete files are kept.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the checkpoint files already in DST.")]
PartOpt = Annotated[
    Optional[str],
    typer.Option("--part", metavar="K/N", help="Only part K/N of the shards (a job array index); the last part to finish "
                 "writes the index and config."),
]
SpaceCheckOpt = Annotated[bool, typer.Option(
    "--no-space-check", help="Start even if the destination's filesystem reports less free space than the run "
    "writes (e.g. a filesystem that compresses).")]
FollowLinksOpt = Annotated[bool, typer.Option(
    "--follow-links", help="Read files that are links leading outside the checkpoint (and outside its Hugging Face "
    "cache repository); refused otherwise.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", help="auto (a CUDA GPU if present, else CPU), cpu, cuda, cuda:N, or several: cuda:all, cuda:0,cuda:1.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"dsv3conv {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    _state["debug"] = debug


@contextmanager
def _errors(writes: bool = False):
    """Map the project's errors to one line on stderr and the exit code; a traceback only with --debug."""
    _state["running"] = True
    try:
        yield
    except Dsv3Error as exc:
        if _state["debug"]:
            if getattr(exc, "worker_traceback", ""):
                err.print(Text(f"in the worker process:\n{exc.worker_traceback}"))
            raise
        err.print(f"dsv3conv: error: {exc.naming(_option)}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        hint = "; temporary files removed, rerun with --resume to finish" if writes else ""
        err.print(f"dsv3conv: interrupted{hint}", markup=False)
        raise typer.Exit(130) from None
    except OSError as exc:
        if _state["debug"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        err.print(f"dsv3conv: error: {where}{exc.strerror or exc}", markup=False)
        raise typer.Exit(1) from None


def _option(param: str) -> str:
    """The command-line option of a library parameter: `max_shard_size` -> `--max-shard-size`."""
    return "--" + param.replace("_", "-")


# -------------------------------------------------------------------------------------------- inspect
@app.command(cls=Command, short_help="What a checkpoint holds (headers only): layers, MTP, quantization, parameters.")
def inspect(ckpt: CkptArg, json_out: JsonOpt = False) -> None:
    """What a checkpoint holds: config, layers, MTP, quantization, tensors, parameter counts (headers only).

    Example: dsv3conv inspect ~/models/DeepSeek-V3 --json
    """
    from dsv3conv.checkpoint import Checkpoint
    from dsv3conv.inspection import inspect_checkpoint

    with _errors():
        report = inspect_checkpoint(Checkpoint.open(ckpt))
    print_inspect(report, json_out)
    if report["problems"]:
        err.print(f"dsv3conv: error: {ckpt}: {counted(len(report['problems']), 'problem')} found (listed on stdout)",
                  markup=False)
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------------- dequant
@app.command(cls=Command, short_help="FP8 -> BF16 (or FP16/FP32), bit-exact; config.json and index rewritten.")
def dequant(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="FP8 checkpoint directory.", show_default=False,
                                        readable=False)],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output directory (absent or empty).", show_default=False)],
    mtp: Annotated[str, typer.Option("--mtp", metavar="keep|drop",
                                     help="keep: convert the MTP layers too; drop: leave them out.")] = "keep",
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="bfloat16|float16|float32",
                                       help="The output dtype of the dequantized weights.")] = "bfloat16",
    experts: Annotated[str, typer.Option("--experts", metavar="dequant|fp8", help=(
        "fp8: repack DeepSeek-V4's packed FP4 (MXFP4) experts to 128x128 block FP8, exactly or refused, and copy "
        "every other tensor as it is."))] = "dequant",
    scale_dtype: Annotated[Optional[str], typer.Option(
        "--scale-dtype", metavar="float8_e8m0fnu|float32", show_default=False,
        help="With --experts fp8: the dtype the repacked experts' block scales are stored in (powers of two, "
        "exact in both; default float8_e8m0fnu, as the release's other FP8 weights).")] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    max_shard_size: Annotated[
        Optional[str], typer.Option("--max-shard-size", metavar="SIZE", help="Re-shard to files of at most SIZE (e.g. 5GB).")
    ] = None,
    buffer_size: Annotated[
        Optional[str],
        typer.Option("--buffer-size", metavar="SIZE", help="Bytes read per step (default 64MB on CPU, 32MB on GPU); host buffers "
                     "take at most about 1.3GB (6x this if more), each GPU about 9x this."),
    ] = None,
    part: PartOpt = None,
    allow_noop: Annotated[bool, typer.Option(
        "--allow-noop", help="Copy a checkpoint that holds no FP8 weights instead of refusing it.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Write values that come out NaN or Inf (e4m3 NaN codes, products beyond the "
        "output dtype) instead of stopping; NaN gets the same bits on CPU and GPU.")] = False,
    no_space_check: SpaceCheckOpt = False,
    follow_links: FollowLinksOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """FP8 -> BF16 (or FP16/FP32), bit-exact, streaming; rewrites config.json and the index.

    Example: dsv3conv dequant ~/models/DeepSeek-V3 ~/models/DeepSeek-V3-bf16 --mtp drop
    """
    from dsv3conv.commands import dequantize

    called = time.perf_counter()
    with _errors(writes=True):
        result = dequantize(
            src, dst, mtp=mtp, device=device, dtype=dtype, resume=resume, overwrite=overwrite,
            max_shard_size=max_shard_size, dry_run=dry_run, buffer_size=buffer_size, part=part,
            progress=_progress(quiet, json_out), allow_noop=allow_noop,
            space_check=not no_space_check, follow_links=follow_links, experts=experts,
            allow_nonfinite=allow_nonfinite, scale_dtype=scale_dtype,
        )
    _from_process_start(result, called)
    print_result(result, json_out, dry_run)


# ---------------------------------------------------------------------------------------------- quant
@app.command(cls=Command, short_help="BF16 -> 128x128 block FP8 (e4m3) with scales and quantization_config.")
def quant(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="BF16 (or F16/F32) checkpoint directory.",
                                        show_default=False, readable=False)],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Output directory (absent or empty).", show_default=False)],
    scale_fmt: Annotated[
        str, typer.Option("--scale-fmt", metavar="float|ue8m0", help="float: scale = amax/448; ue8m0: rounded up to a power of two.")
    ] = "float",
    scale_dtype: Annotated[
        str, typer.Option("--scale-dtype", metavar="float32|bfloat16|float16|float8_e8m0fnu",
                          help="The dtype scales are stored in (float8_e8m0fnu needs --scale-fmt ue8m0).")
    ] = "float32",
    skip: Annotated[
        Optional[list[str]],
        typer.Option("--skip", metavar="REGEX", help="Keep tensors whose name matches unquantized (repeatable)."),
    ] = None,
    mtp: Annotated[str, typer.Option("--mtp", metavar="keep|drop",
                                     help="keep: quantize the MTP layers too; drop: leave them out.")] = "keep",
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
    no_space_check: SpaceCheckOpt = False,
    follow_links: FollowLinksOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """BF16 -> 128x128 block FP8 (e4m3), the weights the release has in FP8; writes scales and quantization_config.

    Example: dsv3conv quant ~/models/V3-finetuned-bf16 ~/models/V3-finetuned-fp8 --scale-fmt ue8m0
    """
    from dsv3conv.commands import quantize

    called = time.perf_counter()
    with _errors(writes=True):
        result = quantize(
            src, dst, scale_fmt=scale_fmt, scale_dtype=scale_dtype, skip=skip or [], mtp=mtp, device=device,
            resume=resume, overwrite=overwrite, dry_run=dry_run, progress=_progress(quiet, json_out),
            part=part, space_check=not no_space_check, follow_links=follow_links,
        )
    _from_process_start(result, called)
    print_result(result, json_out, dry_run)
    if not json_out and result["tensors_skipped"]:
        out.print(f"  {counted(result['tensors_skipped'], 'weight')} kept unquantized by --skip (listed in "
                  "quantization_config.modules_to_not_convert)")


# ------------------------------------------------------------------------------------------ split-mtp
@app.command("split-mtp", cls=Command, short_help="Drop the MTP layers, or extract them as a draft checkpoint.")
def split_mtp(
    src: CkptArg,
    main_out: Annotated[
        Optional[Path], typer.Option("--main-out", metavar="DIR", help="Write the checkpoint without its MTP layers here.")
    ] = None,
    mtp_out: Annotated[
        Optional[Path], typer.Option("--mtp-out", metavar="DIR", help="Write the MTP layers here as a standalone draft checkpoint.")
    ] = None,
    mtp_layout: Annotated[
        str, typer.Option("--mtp-layout", metavar="sglang|full", help="sglang: draft without embed_tokens and shared_head.head; full: keep them.")
    ] = "sglang",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    part: PartOpt = None,
    no_space_check: SpaceCheckOpt = False,
    follow_links: FollowLinksOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Drop the MTP layers from a checkpoint, or extract them as a standalone draft checkpoint.

    Tensors are copied byte for byte (FP8 or BF16); shards without MTP tensors are copied whole.

    Example: dsv3conv split-mtp ~/models/DeepSeek-V3 --main-out ~/models/V3-main --mtp-out ~/models/V3-mtp
    """
    from dsv3conv.commands import split_mtp as run_split

    called = time.perf_counter()
    with _errors(writes=True):
        result = run_split(
            src, main_out=main_out, mtp_out=mtp_out, mtp_layout=mtp_layout, resume=resume, overwrite=overwrite,
            dry_run=dry_run, progress=_progress(quiet, json_out), part=part,
            space_check=not no_space_check, follow_links=follow_links,
        )
    _from_process_start(result["main"], called)
    _from_process_start(result["mtp"], called)
    print_split(result, mtp_layout, json_out, dry_run)


# --------------------------------------------------------------------------------------------- verify
@app.command(cls=Command, short_help="Check a checkpoint is whole; with --against, bit-identical to its source.")
def verify(
    ckpt: CkptArg,
    against: Annotated[
        Optional[Path],
        typer.Option("--against", metavar="SRC", help="The source CKPT was converted from: compare with its dequantized tensors "
                     "(or, for a quant output, with quant of it).", show_default=False),
    ] = None,
    sample: Annotated[
        Optional[float],
        typer.Option("--sample", metavar="FRACTION",
                     help="Read this fraction of the tensors (default 0.05; at least one per dtype).", show_default=False),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Read every tensor.")] = False,
    device: Annotated[str, typer.Option(
        "--device", metavar="DEVICE", help="Where --against dequantizes: auto (a CUDA GPU if present, else CPU), cpu, cuda or cuda:N.")
    ] = "auto",
    part: Annotated[
        Optional[str],
        typer.Option("--part", metavar="K/N", help="Read only the data of the shards of part K/N (a job array index); the header "
                     "checks run in every part. Merge the --json reports with verify-combine."),
    ] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prove a checkpoint is whole, and that a converted one equals its dequantized source.

    With --part K/N each job of an array reads one part of the shards; save each report with --json and
    merge them with `dsv3conv verify-combine part-*.json`.

    Example: dsv3conv verify ~/models/DeepSeek-V3-bf16 --against ~/models/DeepSeek-V3
    """
    from dsv3conv.verify import verify_checkpoint

    with _errors():
        report = verify_checkpoint(
            ckpt, against=against, sample=sample, full=full, device=device,
            progress=_progress(quiet, json_out), part=part,
        )
    title = f"verify {ckpt}" + (f" against {against}" if against else "") + (f" part {report['part']}" if part else "")
    print_verify(report, title, json_out)
    if not json_out and part:
        out.print(f"part {report['part']}: {counted(len(report['part_shards']), 'shard')} read: "
                  f"{', '.join(report['part_shards']) or 'none'}", markup=False)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("verify-combine", cls=Command, short_help="Merge the --json reports of `verify --part K/N` into one verdict.")
def verify_combine(
    reports: Annotated[list[Path], typer.Argument(metavar="REPORT", help="The JSON reports of `verify --part K/N --json`, one per part.",
                                                  show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Merge the reports of `verify --part K/N` into one verdict: exit 0 only if every check passes in every part.

    Parts 1..N of one N must all be given, each once (a missing one is named; exit 1). A check passes only if
    it passes in every part; the tensors that differ are the union of the parts'.

    Example: dsv3conv verify-combine verify-1.json verify-2.json verify-3.json
    """
    from dsv3conv.verify import combine_reports

    with _errors():
        report = combine_reports(reports)
    print_verify(report, f"verify: {counted(report['parts'], 'part')} combined", json_out)
    if not report["ok"]:
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------------- example
@app.command(cls=Command, short_help="Write an example checkpoint (tiny FP8 or BF16, real shapes, a replica) to try commands on.")
def example(
    kind: Annotated[str, typer.Argument(metavar="KIND", help="fp8, bf16, real-shapes, replica, v4-replica, "
                                        "v4-flash, v4-flash-base, v4-0731, compressed-tensors, or a sibling "
                                        "release: r1, v3-0324, v3.1, v3.1-e8m0, v3.2, kimi-k2, mtp78, qwen3.",
                                        show_default=False)],
    dst: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write it (absent or empty).",
                                        show_default=False)],
) -> None:
    """Write an example checkpoint made of random weights, to try every command on without a download.

    fp8: a tiny FP8 release (DeepSeek-V3 names and dtypes, 3 layers, MTP at layer 3, 4 shards, 2.5 MB).
    bf16: that checkpoint dequantized (the input `quant` takes). real-shapes: DeepSeek-V3's true tensor shapes,
    2 layers of 8 experts (about 1.6 GB). replica: every header of the full DeepSeek-V3 release in 163 sparse
    shards (688 GB apparent size, no data: for inspect and --dry-run). v4-replica: the same of DeepSeek-V4-Flash
    (46 shards, 160 GB apparent). v4-flash, v4-flash-base, v4-0731: tiny DeepSeek-V4 checkpoints (packed-FP4
    experts, block-FP8 experts, a DSpark drafter). compressed-tensors: a tiny llm-compressor FP8_BLOCK one.
    r1 ... qwen3: tiny FP8 checkpoints laid out as those releases.

    Example: dsv3conv example fp8 tiny-fp8 && dsv3conv inspect tiny-fp8
    """
    from dsv3conv.commands import write_example

    with _errors(writes=True):
        write_example(kind, dst)
    out.print(f"wrote the {kind} example checkpoint to {dst}; try: dsv3conv inspect {dst}", markup=False)


def _on_signal(signum, frame) -> None:
    """SIGINT or SIGTERM (a job scheduler's time limit or preemption): clean up like Ctrl-C, exit 130.

    The first one counts; later ones are ignored, so that removing temporary files is never cut short. Before
    a command has begun (start-up: imports, parsing) there is nothing to clean: say so and exit at once.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not _state["running"]:
        sys.stderr.write("dsv3conv: interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    raise KeyboardInterrupt


def main() -> None:
    from dsv3conv.cli_output import flush_output

    # Writing past a file-size limit must be an error we can report, not a silent kill.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a host installed its own
        signal.signal(signal.SIGINT, _on_signal)
    try:
        app(prog_name="dsv3conv")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            err.print(str(exc.code), markup=False)
        flush_output()  # a reader gone from stdout or stderr (`| head`) leaves the exit code as it is
        if "torch" in sys.modules:
            # Everything is written, closed and reported. The interpreter's teardown of torch costs about half
            # a second of CPU (seconds on a busy host) and frees nothing the OS will not: skip it.
            os._exit(code)
        raise
