"""``glm4v eval <benchmark> --data FILE``: the model card's benchmarks, and the synthetic split.

    glm4v eval mmbench --data MMBench_DEV_EN.tsv              # the embedded model
    glm4v eval mme --data MME.tsv --model /models/glm-4v-9b --device cuda --batch-size 8
    glm4v eval ocrbench --data OCRBench.tsv --limit 20        # a quick look at 20 questions

Benchmark files are VLMEvalKit's TSVs (see docs/EVALUATION.md). ``glm4v eval synth`` is the
synthetic test split, implemented in ``glm4v.eval.synth`` with its own options.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
from pathlib import Path

from glm4v.engine import add_model_arguments
from glm4v.errors import Glm4vError, InputError
from glm4v.eval import multiple_choice, ocrbench, yes_no
from glm4v.eval.runner import Benchmark, Generator, run_benchmark

BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("mmbench", "MMBench EN/CN (circular evaluation)", multiple_choice.build_mmbench_items,
                  multiple_choice.score_mmbench, multiple_choice.submission_rows),
        Benchmark("seedbench", "SEEDBench_IMG", multiple_choice.build_items, multiple_choice.score,
                  multiple_choice.submission_rows),
        Benchmark("mmstar", "MMStar", multiple_choice.build_items, multiple_choice.score,
                  multiple_choice.submission_rows),
        Benchmark("mmmu", "MMMU (multiple-choice and open questions)", multiple_choice.build_mmmu_items,
                  multiple_choice.score_mmmu, multiple_choice.submission_rows),
        Benchmark("mme", "MME (perception + cognition)", yes_no.build_mme_items, yes_no.score_mme),
        Benchmark("hallusionbench", "HallusionBench (aAcc, fAcc, qAcc)", yes_no.build_hallusion_items,
                  yes_no.score_hallusion),
        Benchmark("ai2d", "AI2D", multiple_choice.build_items, multiple_choice.score,
                  multiple_choice.submission_rows),
        Benchmark("ocrbench", "OCRBench (score out of 1000)", ocrbench.build_items, ocrbench.score),
    )
}

SYNTH_MODULE = "glm4v.eval.synth"


def _load_synth():
    """(module, None) when the synthetic benchmark is installed, else (None, why not)."""
    try:
        return importlib.import_module(SYNTH_MODULE), None
    except ModuleNotFoundError as e:
        if e.name == SYNTH_MODULE:
            return None, f"the synthetic benchmark is not part of this installation ({SYNTH_MODULE} is missing)"
        return None, f"glm4v eval synth is unavailable: {e}"
    except ImportError as e:
        return None, f"glm4v eval synth is unavailable: {e}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_eval_parser=parser)
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for benchmark in BENCHMARKS.values():
        p = sub.add_parser(benchmark.name, help=benchmark.title, description=benchmark.title)
        _common_arguments(p)
        if benchmark.name == "mmbench":
            p.add_argument("--circular", choices=("auto", "off"), default="auto",
                           help="auto (default): circular evaluation over the rotations in the file, built when the "
                                "file has none; off: score the original questions only")
    synth, why_not = _load_synth()
    help_text = "the synthetic test split (glm4v.eval.synth)"
    if synth is not None:
        synth.add_arguments(sub.add_parser("synth", help=help_text, description=help_text))
    else:
        # no option prefix: whatever follows (even --help) is accepted, so run() can say why it is unavailable
        p = sub.add_parser("synth", help=help_text, prefix_chars="\0", add_help=False)
        p.set_defaults(_synth_unavailable=why_not)
        p.add_argument("synth_args", nargs="*")


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, metavar="FILE", help="the benchmark's VLMEvalKit .tsv file")
    add_model_arguments(p, default_device=None)  # None: cuda when available
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="questions generated together (default 4)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N questions (MMBench: question groups; MME: pictures)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="cap on answer length (default: the official max_length=2048 tokens including the prompt)")
    p.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                   help="where predictions and results go (default: eval-results/<model name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class LazyGenerator:
    """Loads the model on the first batch only: a fully cached run rescores without loading it."""

    def __init__(self, args):
        self.args = args
        self.generator = None

    def __call__(self, items):
        if self.generator is None:
            from glm4v.engine import load_from_args

            pipe = load_from_args(self.args)
            self.generator = Generator(pipe, max_new_tokens=self.args.max_new_tokens)
        return self.generator(items)


def model_identity(args) -> str:
    """What a prediction cache belongs to: answers of another model, quantisation or adapter differ."""
    identity = "embedded" if args.model is None else str(Path(args.model).resolve())
    if args.quantize:
        identity += f"+{args.quantize}" + (f"-g{args.group_size}" if args.quantize == "int4" else "")
    if args.lora:
        identity += f"+lora:{Path(args.lora).resolve()}"
    return identity


def run(args) -> int:
    name = getattr(args, "benchmark", None)
    if name is None:
        args._eval_parser.print_help()
        return 2
    if name == "synth":
        why_not = getattr(args, "_synth_unavailable", None)
        if why_not:
            raise Glm4vError(why_not)
        synth, why_not = _load_synth()
        return synth.run(args)

    benchmark = BENCHMARKS[name]
    if name == "mmbench":
        benchmark = dataclasses.replace(benchmark, build=functools.partial(benchmark.build, circular=args.circular))
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if args.model is not None and not Path(args.model).is_dir():
        raise InputError(f"{args.model}: no such model folder")
    output_dir = args.output_dir or Path("eval-results") / (Path(args.model).resolve().name if args.model else "embedded")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"dtype": args.dtype, "device": args.device, "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens, "decoding": "greedy"}
    if name == "mmbench":
        settings["circular"] = args.circular
    run_benchmark(benchmark, args.data, LazyGenerator(args), output_dir=output_dir, model_id=model_identity(args),
                  batch_size=args.batch_size, limit=args.limit, settings=settings, progress=not args.no_progress)
    return 0
