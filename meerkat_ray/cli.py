"""`meerkat-ray run | tune | analyze | export` (also `python -m meerkat_ray`).

Bad input exits with status 2 and one `error: ...` line on stderr naming the key or path, before
any model or cluster starts.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .errors import MeerkatError

OFFLINE_DEFAULTS = {"TOKENIZERS_PARALLELISM": "false"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meerkat-ray", description="Federated zeroth-order LLM fine-tuning on a sparse mask.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one federated experiment (no arguments: the embedded default)")
    run.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished round "
                     "(its config.yaml is the config)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    tune = sub.add_parser("tune", help="run a Ray Tune sweep: a base config, a grid of keys, Tune settings")
    tune.add_argument("items", nargs="+", metavar="SWEEP.yaml [key=value ...]",
                      help="overrides: tune.K=V, grid.K=[...], base.K=V or K=V (a base key)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted sweep in its sweep folder")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing sweep folder of the same name")
    tune.add_argument("--quiet", action="store_true", help="no progress output")
    analyze = sub.add_parser("analyze", help="figures and an HTML report of a run, a sweep or a folder of runs")
    analyze.add_argument("dir", metavar="DIR", help="a run folder, a sweep folder or a folder holding run folders")
    analyze.add_argument("--out", metavar="OUT", help="where the report and figures go (default: DIR/analysis)")
    export = sub.add_parser("export", help="write a Hugging Face model folder with the fine-tuned values")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags may stand anywhere among the `key=value` items (`run a=1 --quiet b=2`): argparse fills
    a positional list from its first run of items only, so the later items are appended here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    flags = [item for item in extra if item.startswith("-")]
    if flags or (extra and not hasattr(args, "items")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.items = [*args.items, *extra]
    return args


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """First item may be a YAML file; the rest are key=value overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args) -> int:
    from .config import load_config
    from .errors import ConfigError

    if args.resume is not None:
        if args.items:
            raise ConfigError("run --resume: takes no config file or overrides (the run folder's config.yaml is "
                              f"the config), got {args.items[0]!r}")
        if args.overwrite:
            raise ConfigError("run: --resume and --overwrite exclude each other")
        from .checkpoint import open_resume
        from .runner import run_stored
        from .storage import open_resume_uri
        from .uris import is_uri

        # every file checked before a model or cluster starts (a stored run is downloaded first)
        cfg, checkpoint = open_resume_uri(args.resume) if is_uri(args.resume) else open_resume(args.resume)
        from .tracking import run_tracked  # MLflow / W&B where tracking.* asks for them

        run_tracked(cfg, run_stored, progress=not args.quiet, resume=checkpoint)
        return 0
    path, overrides = split_items(args.items)
    cfg = load_config(path, overrides)
    from .runner import run_stored
    from .tracking import run_tracked

    run_tracked(cfg, run_stored, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def cmd_tune(args) -> int:
    from .errors import ConfigError
    from .sweep_file import load_sweep

    path, overrides = split_items(args.items)
    if path is None:
        raise ConfigError("tune: the first argument must be a sweep file (SWEEP.yaml)")
    sweep = load_sweep(path, overrides)  # every grid point validated before Ray starts
    if args.resume and args.overwrite:
        raise ConfigError("tune: --resume and --overwrite exclude each other")
    from .distributed.tune import error_file, run_sweep

    table = run_sweep(sweep, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    failed = table[table["status"] == "error"]
    unfinished = int((table["status"] == "stopped").sum()) if sweep.tune.scheduler != "asha" else 0
    unfinished += max(0, sweep.expected_trials - len(table))  # a search interrupted before proposing them all
    again = shlex.join(["meerkat-ray", "tune", path, *overrides, "--resume"])
    if len(failed):
        print(f"error: {len(failed)} of {len(table)} trials failed; `{again}` retries them", file=sys.stderr)
        for row in failed.itertuples():
            print(f"  trial {row.trial_id}: {row.error} (all of it: {error_file(sweep, row.trial_path)})",
                  file=sys.stderr)
        return 1
    if unfinished:
        print(f"error: interrupted with {unfinished} trials unfinished; `{again}` continues them",
              file=sys.stderr)
        return 130
    return 0


def cmd_analyze(args) -> int:
    from analysis import AnalysisError, analyze  # reads run folders only: no torch, no Ray

    from .storage import local_copy, resolve
    from .uris import is_uri, uri_join

    # a folder at a URI is read from a temporary local copy (Tune's own files are not needed);
    # without --out the report goes back to DIR/analysis there
    with local_copy(args.dir, skip=("tune", "analysis")) as folder:
        try:
            report = analyze(folder, args.out)
        except AnalysisError as exc:
            raise MeerkatError(str(exc).replace(str(folder), args.dir)) from None
        if is_uri(args.dir) and not args.out:
            store = resolve(args.dir, args.dir).child("analysis")
            for path in sorted(p for p in report.html.parent.rglob("*") if p.is_file()):
                store.upload_file(path, path.relative_to(report.html.parent).as_posix())
            print(f"wrote {uri_join(args.dir, 'analysis', report.html.name)} ({len(report.figures)} figures beside it)")
            return 0
    print(f"wrote {report.html} ({len(report.figures)} figures beside it)")
    return 0


def cmd_export(args) -> int:
    from .export import export_model
    from .storage import local_copy

    with local_copy(args.run_dir, skip=("tb",)) as run_dir:  # a run folder at a URI: a temporary local copy
        out = export_model(run_dir, args.out_dir)
    print(f"wrote {out}")
    return 0


COMMANDS = {"run": cmd_run, "tune": cmd_tune, "analyze": cmd_analyze, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MeerkatError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever a value held
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (a file where a folder should be, no space, no permission)
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
