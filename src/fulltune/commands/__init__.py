"""One module per verb of the `fulltune` command. Each has `register(sub)`, which adds its parser(s)
to argparse's subparsers and sets `run` (a function of the parsed arguments returning the exit code,
or None for 0). Modules import what their verb needs inside `run`, so `fulltune --help` stays fast.
The training core they call lives one level up, in `fulltune/`."""

# In the order `fulltune --help` lists them; `generate` registers both chat and generate.
VERBS = (
    "train",
    "schedule",
    "memory",
    "plan",
    "eval",
    "interpolate",
    "export",
    "generate",
    "report",
    "compare",
    "assets",
    "config",
    "verify",
)


def add_precision(parser) -> None:
    """--precision for the verbs that score a model (eval, interpolate), as train.precision names it."""
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16-mixed", "fp32"),
        default="auto",
        help="as train.precision (auto: bf16-mixed where there are bf16 units)",
    )
