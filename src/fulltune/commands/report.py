"""`fulltune report RUN_DIR`: (re)write RUN/report.html for a finished, running or interrupted run."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    r = sub.add_parser("report", help="write RUN/report.html: losses, rates, memory, forgetting, data, config")
    r.add_argument("run_dir", help="a run directory (train.output_dir)")
    r.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    r.set_defaults(run=run)


def run(args) -> None:
    from fulltune.report import write_report

    out = write_report(Path(args.run_dir).expanduser(), Path(args.out).expanduser() if args.out else None)
    print(f"[report] {out}")
