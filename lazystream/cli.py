"""The ``lazystream`` command: ``plan``, ``demo`` and ``bench``.

Only the standard library is imported here: ``--help``, ``--version`` and argument errors
answer without importing torch; each command imports what it needs when it runs. A
lazystream error is printed as one line (``--debug`` shows the traceback) and the exit
status says whose it is: 2 for bad input, 1 for a failure while running.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from . import __version__
from .demo import DEMO_SIZE
from .errors import LazyStreamError

DESCRIPTION = """\
Run Hugging Face models larger than the GPU: keep N blocks resident on the device
and stream the rest straight from the safetensors shards."""
EPILOG = """\
exit status: 0 done; 1 failed while running (no network, out of memory, ...);
             2 bad input (arguments, paths, checkpoints)
Run 'lazystream COMMAND --help' for the options of a command."""

# The Python arguments that plan's options stand for: lazystream's errors name the
# arguments of the Python API, and the command line says the options the user typed.
PLAN_OPTIONS = {"max_gpu_memory": "--vram", "activation_reserve": "--activation-reserve", "keep_gpu": "--keep-gpu",
                "prefetch": "--prefetch", "placement": "--placement", "subfolder": "--subfolder",
                "revision": "--revision", "device": "--device", "dtype": "--dtype"}
DEMO_OPTIONS = {"keep_gpu": "--keep-gpu", "device": "--device"}


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other error; argparse would print the usage above it.
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if rest and args.command != "bench":  # bench parses its own arguments
        args.parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args, rest)
    except LazyStreamError as exc:
        if args.debug:
            raise
        print(f"lazystream {args.command}: error: {_cli_words(str(exc), args.options)}", file=sys.stderr)
        bad_input = isinstance(exc, (ValueError, LookupError, FileNotFoundError))
        return 2 if bad_input else 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"lazystream {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="lazystream", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"lazystream {__version__} from {Path(__file__).parent} (Python "
                                f"{sys.version_info.major}.{sys.version_info.minor})")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.set_defaults(command=None, debug=False, options={})
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")

    raw = argparse.RawDescriptionHelpFormatter  # descriptions and examples keep their lines
    plan = sub.add_parser(
        "plan", help="the plan for a checkpoint, from its headers alone (no weight is read)", formatter_class=raw,
        description="""\
The plan for a checkpoint from its headers and config alone (a hub repo that is
not cached is read by range requests): blocks and bytes, resident or streamed,
device memory by term, host memory, and the predicted time per call.""",
        epilog="""\
examples:
  lazystream plan ./my-checkpoint --keep-gpu 20
  lazystream plan Tongyi-MAI/Z-Image-Turbo --subfolder transformer --vram 8GiB""")
    plan.add_argument("repo", metavar="REPO", help="a local folder, a Hugging Face repo id (org/name), or a single .safetensors file (with --config)")
    plan.add_argument("--subfolder", help="the component's folder inside REPO, e.g. transformer for a pipeline")
    plan.add_argument("--config", metavar="REPO",
                      help="for a single .safetensors file: the repo or folder of its diffusers config (with --subfolder)")
    plan.add_argument("--revision", help="branch, tag or commit of a hub repo (default: main)")
    plan.add_argument("--keep-gpu", type=_keep_gpu, default="auto", metavar="N|auto",
                      help="blocks kept resident on the device, or auto: as many as fit --vram (default: auto)")
    plan.add_argument("--vram", type=_byte_size, metavar="SIZE",
                      help="device memory budget, e.g. 8GiB (default: the free device memory less 5%%); with a "
                           "number for --keep-gpu, a plan over it is reported")
    plan.add_argument("--activation-reserve", type=_byte_size, metavar="SIZE",
                      help="device memory held back for activations, e.g. 1GiB (default: 10%% of --vram until a "
                           "first call measures it)")
    plan.add_argument("--placement", default="spread", choices=["first", "spread", "cost"],
                      help="which blocks stay resident: evenly spaced (spread, default), the first N (first), or "
                           "those the cost model says save the most time (cost)")
    plan.add_argument("--prefetch", type=_count(1), default=2, metavar="K",
                      help="device slots for streamed blocks (default: 2)")
    plan.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                      help="the dtype keyword of the load, as the library takes it (default: the library's: "
                           "transformers \"auto\", the config's or the weights'; diffusers float32)")
    plan.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    plan.add_argument("--lora", action="append", default=[], metavar="FILE",
                      help="a LoRA adapter you will load (its .safetensors file or folder; repeatable): its resident "
                           "bytes are counted, and kept out of --vram with --keep-gpu auto")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_debug(plan)
    plan.set_defaults(run=_run_plan, options=PLAN_OPTIONS, parser=plan)

    blocks = DEMO_SIZE["num_hidden_layers"]
    demo = sub.add_parser(
        "demo", help="build a demo Qwen3 checkpoint and compare streamed with resident", formatter_class=raw,
        description="""\
Build (once, ~500 MB under ~/.cache/lazystream) a random-weight Qwen3 checkpoint;
generate with the library's own model, fully resident and streamed, each in a
process of its own; check that the tokens agree; show time and memory.""")
    demo.add_argument("--keep-gpu", type=_count(0), metavar="N",
                      help=f"blocks kept resident in the streamed run (default: {blocks // 2} of its {blocks})")
    demo.add_argument("--tokens", type=_count(1), default=16, metavar="N", help="tokens to generate (default: 16)")
    demo.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    _add_debug(demo)
    demo.set_defaults(run=_run_demo, options=DEMO_OPTIONS, parser=demo)

    # add_help=False: 'lazystream bench --help' reaches the benchmark's own parser.
    bench = sub.add_parser("bench", add_help=False,
                           help="every offloader side by side against the hardware floor (see bench --help)")
    bench.set_defaults(run=_run_bench)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # Also accepted after the command; SUPPRESS keeps the value given before it.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


def _run_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from . import plan_report

    return plan_report.run(args)


def _run_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from .demo import demo

    return demo(args.keep_gpu, args.tokens, args.device)


def _run_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(rest)


# -- argument types: a bad value is an argparse error naming the option -----------------


def _keep_gpu(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of blocks >= 0 or 'auto', got {text!r}")
    return int(text)


def _count(minimum: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return count


def _byte_size(text: str) -> int:
    from .planner import parse_bytes  # imports torch; only once the option is given

    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 8GiB, 500MB or 6442450944, got {text!r}") from None


def _cli_words(message: str, options: Mapping[str, str]) -> str:
    """``message`` with the Python arguments it names written as the command's options:
    ``keep_gpu=2`` or ``keep_gpu='auto'`` as ``--keep-gpu 2``; a bare name only where it has
    an underscore (``max_gpu_memory``), since plain words such as "device" are also prose."""
    if not options:
        return message
    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    message = re.sub(rf"\b({names})=(?:'([^']*)'|([^\s,;)]+))",
                     lambda m: f"{options[m.group(1)]} {m.group(2) if m.group(2) is not None else m.group(3)}",
                     message)
    bare = "|".join(re.escape(n) for n in options if "_" in n)
    return re.sub(rf"(?<![-\w])({bare})\b", lambda m: options[m.group(1)], message) if bare else message


if __name__ == "__main__":
    sys.exit(main())
