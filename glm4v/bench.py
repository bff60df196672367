"""``glm4v bench``: speed and memory of GLM-4V-9B on this machine, measured against its own limits.

The real 9B weights are not needed (and do not fit in bf16 on a 24 GB machine): the benchmark writes
a random-weight checkpoint at the official widths with a few layers (``--lm-layers``,
``--vision-layers``), times every layer with hooks, and extrapolates the per-layer costs to the
official 40 decoder / 63 vision layers (labelled as such). In the same run it measures the two
limits that matter: streaming memory bandwidth (the decode roofline: a decode step reads every
weight once) and bf16 matmul throughput (vision tower and prefill are matmuls).

For each weight format (bf16, int8, int4) a fresh worker process loads the checkpoint (peak RSS
and time, quantising on load for int8/int4), then runs image -> prefill -> decode -> a second turn
through the prefix cache, ``--repeats`` times; the reported numbers are medians. A second worker
loads the pre-quantised copy the first one saved (the way a 9B model is loaded for real).

``glm4v bench serving ...`` is the serving benchmark (glm4v/bench_serving.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from glm4v.errors import Glm4vError, InputError

OFFICIAL_LM_LAYERS = 40
OFFICIAL_VISION_LAYERS = 63

# The official GLM-4V-9B config.json (the widths the benchmark builds).
OFFICIAL_CONFIG = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "vision_config": {
        "dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63, "hidden_size": 1792,
        "patch_size": 14, "num_heads": 16, "intermediate_size": 15360, "layer_norm_eps": 1e-06,
        "num_positions": 6401, "image_size": 1120, "scaling_factor": 8,
    },
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "ffn_hidden_size": 13696, "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1.5625e-07,
    "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 40,
    "original_rope": True, "padded_vocab_size": 151552, "post_layer_norm": True, "rmsnorm": True,
    "seq_length": 8192, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "boi_token_id": 151339, "eoi_token_id": 151340,
}

FORMATS = ("bf16", "int8", "int4")
GB = 1e9


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lm-layers", type=int, default=4,
                        help="decoder layers to build (extrapolated to 40); keep a decode step's weights well above the L3 cache")
    parser.add_argument("--vision-layers", type=int, default=2, help="vision layers to build (extrapolated to 63)")
    parser.add_argument("--formats", default="bf16,int8,int4", help="comma-separated weight formats (bf16,int8,int4)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128, 256)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (medians are reported)")
    parser.add_argument("--decode-tokens", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--text-tokens", type=int, default=50, help="text tokens around the image in turn 1")
    parser.add_argument("--turn2-tokens", type=int, default=24, help="new tokens of the follow-up question")
    parser.add_argument("--image-size", type=int, default=1120, help="image side (official 1120; smaller = quicker smoke test)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workdir", default=None, help="where to write the random checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir for the next run")
    parser.add_argument("--skip-limits", action="store_true", help="do not measure bandwidth / matmul peak (tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_widths", default=None, help=argparse.SUPPRESS)  # JSON config overrides (tests)
    _add_serving(parser)


def _add_serving(parser: argparse.ArgumentParser) -> None:
    """``glm4v bench serving ...`` belongs to glm4v/bench_serving.py; it is wired in here."""
    sub = parser.add_subparsers(dest="bench_mode", metavar="{serving}")
    help_text = "throughput and latency of the HTTP server under concurrent requests"
    serving = sub.add_parser("serving", help=help_text, description=help_text)
    try:
        import glm4v.bench_serving as bench_serving
    except ImportError as e:
        serving.add_argument("rest", nargs=argparse.REMAINDER)
        serving.set_defaults(_serving_unavailable=str(e))
        return
    bench_serving.add_arguments(serving)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_mode", None) == "serving":
        if getattr(args, "_serving_unavailable", None):
            raise Glm4vError(f"glm4v bench serving is unavailable: {args._serving_unavailable}")
        import glm4v.bench_serving as bench_serving

        return bench_serving.run(args)
    if args._worker:
        return _worker_main(json.loads(args._worker))
    options = _validate(args)
    report = run_benchmark(options, log=_log)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
    return 0


def _validate(args) -> dict:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"--formats: unknown format(s) {bad or formats}; use bf16, int8, int4")
    for name in ("lm_layers", "vision_layers", "repeats", "decode_tokens", "text_tokens", "turn2_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lm_layers > OFFICIAL_LM_LAYERS or args.vision_layers > OFFICIAL_VISION_LAYERS:
        raise InputError(f"at most {OFFICIAL_LM_LAYERS} decoder and {OFFICIAL_VISION_LAYERS} vision layers")
    from glm4v.quant import check_group_size

    check_group_size(args.group_size)
    if args.image_size % 28 or args.image_size < 56:
        raise InputError("--image-size must be a multiple of 28 (patch 14, 2x2 conv), at least 56")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA GPU")
    if args.threads < 0:
        raise InputError("--threads must be >= 0")
    return {
        "lm_layers": args.lm_layers, "vision_layers": args.vision_layers, "formats": formats,
        "group_size": args.group_size, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
        "text_tokens": args.text_tokens, "turn2_tokens": args.turn2_tokens, "image_size": args.image_size,
        "threads": args.threads, "device": str(device), "workdir": args.workdir, "keep": args.keep,
        "skip_limits": args.skip_limits, "widths": json.loads(args._widths) if args._widths else None,
    }


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- the benchmark (parent process) ----------------------------------------------------------------


def bench_config(lm_layers: int, vision_layers: int, image_size: int = 1120, widths: dict | None = None) -> dict:
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    for key, value in (widths or {}).items():
        if key == "vision_config":
            config["vision_config"].update(value)
        else:
            config[key] = value
    config["num_layers"] = lm_layers
    vc = config["vision_config"]
    vc["num_hidden_layers"] = vision_layers
    vc["image_size"] = image_size
    vc["num_positions"] = (image_size // vc["patch_size"]) ** 2 + 1
    return config


def run_benchmark(options: dict, log=_log) -> dict:
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    workdir = Path(options["workdir"]) if options["workdir"] else Path(tempfile.mkdtemp(prefix="glm4v-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(options),
        "depth": {"lm_layers": options["lm_layers"], "vision_layers": options["vision_layers"]},
        "extrapolated_to": {"lm_layers": OFFICIAL_LM_LAYERS, "vision_layers": OFFICIAL_VISION_LAYERS},
        "settings": {k: options[k] for k in ("repeats", "decode_tokens", "text_tokens", "turn2_tokens",
                                             "image_size", "group_size", "device")},
    }
    try:
        limits = []
        if not options["skip_limits"]:
            log("measuring memory bandwidth and bf16 matmul throughput")
            limits.append(measure_limits(options["device"]))
        config = bench_config(options["lm_layers"], options["vision_layers"], options["image_size"], options["widths"])
        tag = "" if not options["widths"] else "-custom"
        source = workdir / f"bf16-lm{options['lm_layers']}-v{options['vision_layers']}-img{options['image_size']}{tag}"
        if not (source / "model.safetensors.index.json").exists():
            log(f"writing a random-weight checkpoint at official widths to {source}")
            write_random_checkpoint(source, config)
        report["formats"] = {}
        for fmt in options["formats"]:
            log(f"{fmt}: load and run")
            spec = {**options, "format": fmt, "source": str(source), "mode": "run",
                    "save_to": str(workdir / f"{fmt}-g{options['group_size']}-{source.name}") if fmt != "bf16" else None}
            result = _spawn_worker(spec)
            if fmt != "bf16":
                log(f"{fmt}: load the pre-quantised copy")
                pre = _spawn_worker({**spec, "mode": "load", "source": spec["save_to"], "format": "bf16"})
                result["prequantized_load_s"] = pre["load_s"]
                result["prequantized_load_peak_rss_gb"] = pre["load_peak_rss_gb"]
                result["prequantized_resident_gb"] = pre["resident_gb"]
                if not options["keep"]:
                    shutil.rmtree(spec["save_to"], ignore_errors=True)
            report["formats"][fmt] = result
        if not options["skip_limits"]:
            limits.append(measure_limits(options["device"]))
        report.update(_merge_limits(limits, options["device"]))
        report["decode_overhead"] = measure_step_overhead(options["device"])
        _add_fractions(report)
    finally:
        if not options["keep"]:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return report


def _spawn_worker(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        path = out.name
    try:
        spec = {**spec, "result_path": path}
        cmd = [sys.executable, "-m", "glm4v.cli", "bench", "--_worker", json.dumps(spec)]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            raise Glm4vError(f"benchmark worker for {spec['format']} failed (exit {proc.returncode})")
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def machine_info(options: dict) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "threads": options["threads"] or torch.get_num_threads(),
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if options["device"].startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(options["device"]))
    else:
        from glm4v.kernels import cpu_kernels

        module = cpu_kernels()  # built here, not inside a timed worker
        info["decode_kernels"] = getattr(module, "kernel_set", None) or "torch"
    return info


# -- machine limits ------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device="cpu", warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 64 << 20


MATMUL_SHAPES = {"prefill_mlp": (1650, 4096, 27392), "vision_mlp": (6401, 1792, 15360)}


def matmul_compute_dtype(device="cpu") -> str:
    """What the peak (and the model's prefill) multiplies in on ``device``."""
    from glm4v.kernels import cpu_has_native_bf16

    return "float32 (bf16 is emulated on this CPU)" if torch.device(device).type == "cpu" and not cpu_has_native_bf16() else "bf16"


def measure_limits(device="cpu", repeats: int = 5, buffer_bytes: int | None = None, shapes: dict | None = None) -> dict:
    """Streaming read bandwidth (GB/s) and bf16 matmul throughput (GFLOP/s), medians of ``repeats``.

    Bandwidth: reads of a buffer 4x the last-level cache (at least 2 GB), every byte once, by each
    probe this machine has: torch's fp32 ``sum()``, and on CPUs with glm4v's kernels their
    ``stream_read`` (several streams per thread with software prefetch, as the decode loops read
    weights; torch's one-stream reads stop at ~75 % of that on a Xeon with AMX). The faster
    probe is the roofline, so no decode figure can beat the memory limit it is compared with.
    Matmul: bf16 products shaped like the prefill MLP and the vision MLP, after at least a second
    of warm-up (the first AMX products of a process run at ~60 % of the later ones); the faster
    shape is the peak the model's matmuls are compared with. The products take the path the
    model's layers take for bf16 weights (glm4v.kernels.linear): bf16 where the hardware has it,
    float32 where bf16 would be emulated, so the peak is the fastest way this machine has to
    multiply them.
    """
    size = buffer_bytes or (max(2 << 30, 4 * _l3_bytes()) if torch.device(device).type == "cpu" else 4 << 30)
    buf = torch.ones(size // 4, dtype=torch.float32, device=device)
    probes = bandwidth_probes(buf)
    bw = {name: [size / t / GB for t in _timed(fn, repeats, device)] for name, fn in probes.items()}
    del buf, probes
    from glm4v.kernels import linear

    peaks = {}
    for name, (m, k, n) in (shapes or MATMUL_SHAPES).items():
        a = torch.randn(m, k, device=device).to(torch.bfloat16)
        w = torch.randn(n, k, device=device).to(torch.bfloat16)
        _warm_up(lambda: linear(a, w), device)
        peaks[name] = statistics.median(2 * m * k * n / t / 1e9 for t in _timed(lambda: linear(a, w), 3, device))
        del a, w
    return {"bandwidth_by_probe": bw, "matmul_gflops_by_shape": peaks}


def bandwidth_probes(buf: torch.Tensor) -> dict:
    """Each read probe this machine has, reading every byte of ``buf`` once: torch's fp32 ``sum()``,
    and on CPUs with glm4v's kernels their ``stream_read``."""
    probes = {"torch sum": lambda: buf.sum()}
    if buf.device.type == "cpu":
        from glm4v.kernels import cpu_kernels

        module = cpu_kernels()
        if module is not None and hasattr(module, "stream_read"):
            probes["glm4v stream_read"] = lambda: module.stream_read(buf)
    return probes


def paired_probe(device, size: int):
    """A function returning the memory bandwidth (GB/s) right now: the fastest probe's read of a
    ``size``-byte buffer. Called after every decode step, so each step has its own roofline."""
    buf = torch.ones(size // 4, dtype=torch.float32, device=device)
    probes = list(bandwidth_probes(buf).values())

    def probe() -> float:
        best = 0.0
        for fn in probes:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = max(best, size / (time.perf_counter() - start) / GB)
        return best

    return probe


def paired_matmul_probe(device, shapes: dict | None = None):
    """A function of a shape's name (a key of ``shapes``, default ``MATMUL_SHAPES``) returning the
    bf16 matmul throughput (GFLOP/s) right now: one product of that shape, on the path the model's
    bf16 products take. Called after each vision encode and each prefill, so each has its own peak,
    as each decode step has its own bandwidth: on a shared host the peak moved 776-2408 GFLOP/s
    within an hour, and the probes at the start and end of a run can be far from what a format's
    products had minutes later (docs/PERFORMANCE.md)."""
    from glm4v.kernels import linear

    operands = {name: (torch.randn(m, k, device=device).to(torch.bfloat16),
                       torch.randn(n, k, device=device).to(torch.bfloat16), 2 * m * k * n)
                for name, (m, k, n) in (shapes or MATMUL_SHAPES).items()}

    def probe(name: str) -> float:
        a, w, flops = operands[name]
        _sync(device)
        start = time.perf_counter()
        linear(a, w)
        _sync(device)
        return flops / (time.perf_counter() - start) / 1e9

    return probe


def _warm_up(fn, device, seconds: float = 1.0) -> None:
    _sync(device)
    start = time.perf_counter()
    while True:
        fn()
        _sync(device)
        if time.perf_counter() - start >= seconds:
            return


def _merge_limits(limits: list[dict], device="cpu") -> dict:
    """One set of limits from the measurements before and after the workers: each probe's and each
    shape's median over both, and the fastest probe and shape as the machine's limits."""
    if not limits:
        return {"bandwidth_gbs": None, "matmul_gflops": None}
    by_probe = {name: [s for lim in limits for s in lim["bandwidth_by_probe"][name]] for name in limits[0]["bandwidth_by_probe"]}
    probe = max(by_probe, key=lambda name: statistics.median(by_probe[name]))
    by_shape = {k: [lim["matmul_gflops_by_shape"][k] for lim in limits] for k in limits[0]["matmul_gflops_by_shape"]}
    return {
        "bandwidth_gbs": statistics.median(by_probe[probe]), "bandwidth_gbs_best": max(by_probe[probe]),
        "bandwidth_probe": probe,
        "bandwidth_gbs_by_probe": {name: statistics.median(v) for name, v in by_probe.items()},
        "matmul_gflops": max(statistics.median(v) for v in by_shape.values()),
        "matmul_compute_dtype": matmul_compute_dtype(device),
        "matmul_gflops_by_shape": by_shape,
    }


def measure_step_overhead(device="cpu", steps: int = 100) -> dict:
    """Per-step cost of everything but the matmuls, from a decoder of tiny width (where the
    matmuls take almost nothing): Python, small ops, cache writes, masks."""
    from glm4v.config import GLM4VConfig
    from glm4v.model.glm4v import GLM4VForConditionalGeneration

    config = bench_config(4, 1, 56)
    config.update(hidden_size=64, ffn_hidden_size=128, kv_channels=16, num_attention_heads=4, padded_vocab_size=512,
                  eos_token_id=[500], pad_token_id=500, boi_token_id=501, eoi_token_id=502)
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_heads=2)
    cfg = GLM4VConfig.from_dict(config, "bench tiny config")
    torch.manual_seed(0)
    model = GLM4VForConditionalGeneration(cfg).to(device=device, dtype=torch.bfloat16).eval()
    cache = model.allocate_cache(1, 64 + 2 * steps + 8)
    token = torch.tensor([[7]], device=device)
    with torch.inference_mode():
        model(torch.randint(0, 400, (1, 64), device=device), kv_cache=cache, logits_to_keep=1)
        for _ in range(5):
            model(token, kv_cache=cache, logits_to_keep=1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(token, kv_cache=cache, logits_to_keep=1)
        _sync(device)
        per_step = (time.perf_counter() - start) / steps
        # Once more on one thread: without OpenMP hand-offs this is the Python and dispatch cost
        # alone (on a busy machine the multi-threaded figure also holds waits for a descheduled thread).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            start = time.perf_counter()
            for _ in range(steps):
                model(token, kv_cache=cache, logits_to_keep=1)
            one_thread = (time.perf_counter() - start) / steps
        finally:
            torch.set_num_threads(threads)
    layers = cfg.num_layers
    return {"tiny_step_ms": per_step * 1e3, "per_layer_ms": per_step * 1e3 / layers, "layers": layers,
            "per_layer_ms_1_thread": one_thread * 1e3 / layers}


# -- random checkpoint ---------------------------------------------------------------------------


def write_random_checkpoint(folder: Path, config: dict, seed: int = 0, shard_bytes: int = 1 << 30) -> None:
    """A checkpoint in the official layout with random bf16 weights, written one shard at a time
    (the whole model is never in memory)."""
    from safetensors.torch import save_file

    from glm4v.config import GLM4VConfig
    from glm4v.model.glm4v import GLM4VForConditionalGeneration
    from glm4v.weights import atomic_folder

    cfg = GLM4VConfig.from_dict(config, "bench config")
    with torch.device("meta"):
        model = GLM4VForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed)
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    with atomic_folder(folder) as tmp:
        shards, current, size = [], {}, 0
        weight_map = {}

        def flush():
            nonlocal current, size
            if current:
                name = f"model-{len(shards) + 1:05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append(name)
                weight_map.update({k: name for k in current})
                current, size = {}, 0

        for name, shape in shapes:
            t = torch.empty(shape, dtype=torch.float32)
            if name.endswith("layernorm.weight") or name.endswith("norm1.weight"):
                t.fill_(1.0)
            elif "inv_freq" in name:
                t = 1.0 / (10000 ** (torch.arange(0, shape[0] * 2, 2, dtype=torch.float32) / (shape[0] * 2)))
            else:
                t.normal_(0.0, 0.02, generator=gen)
            t = t.to(torch.float32 if "inv_freq" in name else torch.bfloat16)
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
            current[name] = t
            size += nbytes
        flush()
        # Rename to the official "-of-N" pattern now that N is known.
        final = {}
        for i, name in enumerate(shards):
            official = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.rename(tmp / name, tmp / official)
            final[name] = official
        index = {"metadata": {"total_size": sum((tmp / n).stat().st_size for n in final.values())},
                 "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# -- worker --------------------------------------------------------------------------------------


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc (falls back to getrusage for the peak)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def load_model(folder, dtype, device, quantize=None, group_size=128):
    """What ``glm4v.load`` does with the weights (no tokenizer: the benchmark feeds token ids)."""
    from glm4v.config import GLM4VConfig
    from glm4v.model.glm4v import GLM4VForConditionalGeneration
    from glm4v.model.language import rope_table
    from glm4v.quant import prepare_load
    from glm4v.weights import load_weights

    folder = Path(folder)
    config = GLM4VConfig.from_file(folder / "config.json")
    device = torch.device(device)
    with torch.device("meta"):
        model = GLM4VForConditionalGeneration(config)
    quantizer = prepare_load(model, config, quantize, group_size, dtype, device)
    load_weights(model, folder, dtype, device, on_tensor=quantizer)
    if quantizer is not None:
        quantizer.finish(model)
    model.rope = rope_table(config, device)
    return model.eval().requires_grad_(False)


def _touch(model) -> None:
    """Read every weight once so that all its pages are resident (memory-mapped tensors load lazily)."""
    with torch.inference_mode():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                t.view(-1)[:: max(1, 4096 // t.element_size())].float().sum()


class LayerTimer:
    """Accumulates the wall time spent inside a list of modules (forward hooks)."""

    def __init__(self, layers, device):
        self.device, self.total, self.calls, self._start = device, 0.0, 0, 0.0
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._pre))
            self.handles.append(layer.register_forward_hook(self._post))

    def _pre(self, module, inputs):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, inputs, output):
        _sync(self.device)
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def take(self) -> float:
        total, self.total, self.calls = self.total, 0.0, 0
        return total

    def remove(self):
        for h in self.handles:
            h.remove()


def _module_bytes(module) -> int:
    from glm4v.quant import model_nbytes

    return model_nbytes(module)


def _linear_params(module) -> int:
    """Multiply-accumulates per token of every linear layer inside ``module``."""
    from torch import nn

    from glm4v.quant import QuantizedLinear

    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, (nn.Linear, QuantizedLinear)))


def _worker_main(spec: dict) -> int:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    fmt = spec["format"]
    quantize = None if fmt == "bf16" else fmt
    rss0, _ = _rss_bytes()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = load_model(spec["source"], torch.bfloat16, device, quantize, spec["group_size"])
    _sync(device)
    load_s = time.perf_counter() - start
    _, load_peak = _rss_bytes()
    _touch(model)
    resident, _ = _rss_bytes()
    result = {
        "load_s": load_s, "load_peak_rss_gb": load_peak / GB, "resident_gb": resident / GB,
        "baseline_rss_gb": rss0 / GB, "load_peak_ratio": load_peak / resident,
        "weights_gb": _module_bytes(model) / GB,
    }
    if gpu:  # on a GPU the weights live in its memory: RSS above is the host side only
        result["gpu_resident_gb"] = torch.cuda.memory_allocated(device) / GB
        result["gpu_load_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
        result["gpu_load_peak_ratio"] = result["gpu_load_peak_gb"] / result["gpu_resident_gb"]
    if spec["mode"] == "run":
        result.update(_run_turns(model, spec, device))
        if gpu:
            result["gpu_run_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
        if spec.get("save_to"):
            from glm4v.quant import save_quantized

            class _Pipe:  # save_quantized needs .model and .path
                pass

            pipe = _Pipe()
            pipe.model, pipe.path = model, None
            save_quantized(pipe, spec["save_to"])
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


def _run_turns(model, spec: dict, device) -> dict:
    """Image question -> answer -> follow-up through the prefix cache, timed layer by layer."""
    cfg = model.config
    vc = cfg.vision_config
    gen = torch.Generator().manual_seed(1)
    text = spec["text_tokens"]
    before = text // 3
    ids = torch.randint(0, cfg.pad_token_id - 1, (text + 3,), generator=gen)
    ids[before : before + 3] = torch.tensor([cfg.boi_token_id, cfg.pad_token_id, cfg.eoi_token_id])
    ids = ids[None]
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)
    vision_layers = list(model.transformer.vision.transformer.layers)
    lm_layers = list(model.transformer.encoder.layers)
    v_timer, lm_timer = LayerTimer(vision_layers, device), LayerTimer(lm_layers, device)
    nv, nl = len(vision_layers), len(lm_layers)
    probe = matmul_probe = None
    if not spec["skip_limits"]:
        default = max(256 << 20, 4 * _l3_bytes()) if device.type == "cpu" else 1 << 30
        probe = paired_probe(device, spec.get("probe_bytes") or default)
        matmul_probe = paired_matmul_probe(device, spec.get("matmul_probe_shapes"))
    runs = []
    try:
        with torch.inference_mode():
            for _ in range(spec["repeats"] + 1):  # the first run warms up (page faults, allocator) and is dropped
                runs.append(_one_conversation(model, ids, pixels, spec, device, v_timer, lm_timer, gen, probe,
                                              matmul_probe))
    finally:
        v_timer.remove()
        lm_timer.remove()
    runs = runs[1:]

    def med(key):
        return statistics.median(r[key] for r in runs)

    L = runs[0]["prefill_tokens"]
    T = L + spec["decode_tokens"] // 2  # average context of a decode step
    hd, H, G = cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
    # Per-layer figures, then the official depth.
    v_layer = med("vision_layers_s") / nv
    v_rest = med("vision_total_s") - med("vision_layers_s")
    vision_full = v_rest + OFFICIAL_VISION_LAYERS * v_layer
    p_layer = med("prefill_layers_s") / nl
    p_rest = med("prefill_total_s") - med("prefill_layers_s")
    prefill_full = p_rest + OFFICIAL_LM_LAYERS * p_layer
    d_layer = med("decode_layers_s") / nl
    d_rest = med("decode_step_s") - med("decode_layers_s")
    decode_full = d_rest + OFFICIAL_LM_LAYERS * d_layer
    t2_layer = med("turn2_layers_s") / nl
    t2_full = (med("turn2_total_s") - med("turn2_layers_s") - med("turn2_copy_s")) + OFFICIAL_LM_LAYERS * (
        t2_layer + med("turn2_copy_s") / nl)
    ttft_full = vision_full + prefill_full + med("first_token_s")

    # Work and bytes.
    tokens = vc.num_positions
    v_layer_flops = 2 * tokens * _linear_params(vision_layers[0]) + 4 * tokens * tokens * vc.hidden_size
    vision_rest_flops = (2 * tokens * vc.hidden_size * 3 * vc.patch_size ** 2
                         + 2 * cfg.num_image_tokens * _linear_params(model.transformer.vision.linear_proj)
                         + 2 * cfg.num_image_tokens * vc.hidden_size * 4 * cfg.hidden_size)
    vision_flops_full = OFFICIAL_VISION_LAYERS * v_layer_flops + vision_rest_flops
    p_layer_flops = 2 * L * _linear_params(lm_layers[0]) + 2 * L * L * H * hd  # causal: half of 4*L^2*H*hd
    layer_bytes = _module_bytes(lm_layers[0])
    kv_bytes = 2 * G * T * hd * 2
    head_bytes = _module_bytes(model.transformer.output_layer)
    decode_bytes_full = OFFICIAL_LM_LAYERS * (layer_bytes + kv_bytes) + head_bytes
    # Each step against the bandwidth measured right after it: on a shared host the bandwidth
    # moves by tens of percent within minutes, so the probes before and after all the workers
    # can be far from what a format's decode steps had.
    paired = [decode_bytes_full / (step - layers + OFFICIAL_LM_LAYERS * layers / nl) / GB / bw
              for r in runs for (step, layers), bw in zip(r["decode_steps"], r["decode_probe_gbs"])]
    vision_layer_bytes = _module_bytes(vision_layers[0])
    # The vision and prefill layers against the matmul peak measured right after them, likewise.
    matmul_paired = {}
    if runs[0].get("vision_probe_gflops") is not None:
        for part, flops, count in (("vision", v_layer_flops, nv), ("prefill", p_layer_flops, nl)):
            matmul_paired[f"{part}_probe_gflops"] = statistics.median(r[f"{part}_probe_gflops"] for r in runs)
            matmul_paired[f"{part}_matmul_fraction_paired"] = statistics.median(
                flops / (r[f"{part}_layers_s"] / count) / 1e9 / r[f"{part}_probe_gflops"] for r in runs)
    return {
        **matmul_paired,
        "prefill_tokens": L, "decode_context": T,
        "vision_s_per_layer": v_layer, "vision_s_per_image": vision_full,
        "vision_s_measured": med("vision_total_s"),
        "vision_flops_per_image": vision_flops_full, "vision_layer_flops": v_layer_flops,
        "prefill_s_per_layer": p_layer, "prefill_s": prefill_full, "prefill_tok_s": L / prefill_full,
        "prefill_layer_flops": p_layer_flops,
        "decode_ms_per_layer": d_layer * 1e3, "decode_step_rest_ms": d_rest * 1e3,
        "decode_step_s": decode_full, "decode_tok_s": 1 / decode_full,
        "decode_bytes_per_token": decode_bytes_full,
        "decode_roofline_fraction_paired": statistics.median(paired) if paired else None,
        "decode_probe_gbs": statistics.median(b for r in runs for b in r["decode_probe_gbs"]) if paired else None,
        "ttft_s": ttft_full, "first_token_s": med("first_token_s"),
        "turn2_ttft_s": t2_full, "turn2_ttft_ratio": t2_full / ttft_full,
        "turn2_new_tokens": runs[0]["turn2_new_tokens"], "turn2_prefix": runs[0]["turn2_prefix"],
        "lm_layer_gb": layer_bytes / GB, "vision_layer_gb": vision_layer_bytes / GB,
        "repeats": len(runs), "raw": runs,
    }


def _one_conversation(model, ids, pixels, spec, device, v_timer, lm_timer, gen, probe=None, matmul_probe=None) -> dict:
    cfg = model.config
    out = {}
    v_timer.take(), lm_timer.take()
    _sync(device)
    t0 = time.perf_counter()
    features = model.encode_images(pixels)
    _sync(device)
    out["vision_total_s"] = time.perf_counter() - t0
    out["vision_layers_s"] = v_timer.take()
    if matmul_probe is not None:
        out["vision_probe_gflops"] = matmul_probe("vision_mlp")

    image_slots = features.shape[1]
    L = ids.shape[1] - 3 + image_slots
    capacity = L + spec["decode_tokens"] + spec["turn2_tokens"] + 8
    row = model.allocate_cache(1, capacity)
    lm_timer.take()
    t0 = time.perf_counter()
    logits = model(ids.to(device), image_features=features, kv_cache=row, logits_to_keep=1).logits[0, -1]
    _sync(device)
    out["prefill_total_s"] = time.perf_counter() - t0
    out["prefill_layers_s"] = lm_timer.take()
    out["prefill_tokens"] = L
    t0 = time.perf_counter()
    token = int(torch.argmax(logits.float()))
    out["first_token_s"] = time.perf_counter() - t0
    if matmul_probe is not None:
        out["prefill_probe_gflops"] = matmul_probe("prefill_mlp")

    fed = ids[0].tolist()
    steps, bandwidth = [], []
    for _ in range(spec["decode_tokens"]):
        fed.append(token)
        _sync(device)
        t0 = time.perf_counter()
        logits = model(torch.tensor([[token]], device=device), kv_cache=row, logits_to_keep=1).logits[0, -1]
        token = int(torch.argmax(logits.float()))
        steps.append((time.perf_counter() - t0, lm_timer.take()))
        if probe is not None:
            bandwidth.append(probe())
    out["decode_step_s"] = statistics.median(s for s, _ in steps)
    out["decode_layers_s"] = statistics.median(l for _, l in steps)
    out["decode_steps"], out["decode_probe_gbs"] = steps, bandwidth

    # Turn 2: the follow-up resends the whole history; the prefix cache supplies its keys/values.
    question = torch.randint(0, cfg.pad_token_id - 1, (spec["turn2_tokens"],), generator=gen).tolist()
    turn2_ids = fed + question
    try:
        from glm4v.prefix_cache import PrefixCache
    except ImportError:
        PrefixCache = None
    lm_timer.take()
    if PrefixCache is not None:
        store = PrefixCache(1 << 40, cfg.boi_token_id, image_slots)
        store.store(fed, "bench-image", row)
        row2 = model.allocate_cache(1, capacity)
        _sync(device)
        t0 = time.perf_counter()
        match = store.lookup(turn2_ids, "bench-image")
        t1 = time.perf_counter()
        PrefixCache.load(match, row2)
        _sync(device)
        out["turn2_copy_s"] = time.perf_counter() - t1
        prefix = match.tokens
        if prefix != len(fed):
            raise Glm4vError(f"prefix cache matched {prefix} tokens, expected {len(fed)}")
    else:  # no prefix cache module: continue the same cache (what a hit amounts to)
        row2, prefix = row, len(fed)
        _sync(device)
        t0 = time.perf_counter()
        out["turn2_copy_s"] = 0.0
    new = torch.tensor([turn2_ids[prefix:]], device=device)
    logits = model(new, kv_cache=row2, logits_to_keep=1).logits[0, -1]
    int(torch.argmax(logits.float()))
    _sync(device)
    out["turn2_total_s"] = time.perf_counter() - t0
    out["turn2_layers_s"] = lm_timer.take()
    out["turn2_new_tokens"] = len(turn2_ids) - prefix
    out["turn2_prefix"] = prefix
    return out


# -- report ----------------------------------------------------------------------------------------


def _add_fractions(report: dict) -> None:
    bw, peak = report.get("bandwidth_gbs"), report.get("matmul_gflops")
    lm, vl = report["depth"]["lm_layers"], report["depth"]["vision_layers"]
    for fmt, r in report["formats"].items():
        r["vision_gflops"] = r["vision_flops_per_image"] / r["vision_s_per_image"] / 1e9
        prefill_flops = OFFICIAL_LM_LAYERS * r["prefill_layer_flops"]
        r["prefill_gflops"] = prefill_flops / r["prefill_s"] / 1e9
        r["decode_gbs"] = r["decode_bytes_per_token"] / r["decode_step_s"] / GB
        r["vision_matmul_fraction"] = r["vision_gflops"] / peak if peak else None
        r["prefill_matmul_fraction"] = r["prefill_gflops"] / peak if peak else None
        r["decode_roofline_tok_s"] = bw * GB / r["decode_bytes_per_token"] if bw else None
        r["decode_roofline_fraction"] = r["decode_gbs"] / bw if bw else None
        # Whole-model memory, extrapolated from the measured resident size by the exact bytes of
        # the layers that were not built.
        not_built_gb = (OFFICIAL_LM_LAYERS - lm) * r["lm_layer_gb"] + (OFFICIAL_VISION_LAYERS - vl) * r["vision_layer_gb"]
        r["est_9b_resident_gb"] = r["resident_gb"] + not_built_gb
        r["est_9b_load_peak_rss_gb"] = r["est_9b_resident_gb"] * max(1.0, r["load_peak_ratio"])
        if "gpu_resident_gb" in r:
            r["est_9b_gpu_gb"] = r["gpu_resident_gb"] + not_built_gb


def _probe_note(report: dict) -> str:
    """', by glm4v stream_read; torch sum 20.1' -- which probe set the roofline, and the others' medians."""
    others = {k: v for k, v in report.get("bandwidth_gbs_by_probe", {}).items() if k != report.get("bandwidth_probe")}
    if "bandwidth_probe" not in report:
        return ""
    return f", by {report['bandwidth_probe']}" + "".join(f"; {k} {v:.1f}" for k, v in others.items())


def format_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"glm4v bench -- {m['gpu'] + ' on a host with ' if m.get('gpu') else ''}{m['cpu']}, {m['threads']} threads, torch {m['torch']} ({m['cpu_capability']}), "
        f"decode kernels: {m.get('decode_kernels', 'torch')}, "
        f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}" if m.get("loadavg_start") else "glm4v bench",
        f"built {report['depth']['lm_layers']} decoder + {report['depth']['vision_layers']} vision layers at official "
        f"widths; per-layer costs EXTRAPOLATED to {OFFICIAL_LM_LAYERS} + {OFFICIAL_VISION_LAYERS} layers",
    ]
    if report.get("bandwidth_gbs"):
        lines.append(f"machine limits (measured in this run): memory bandwidth {report['bandwidth_gbs']:.1f} GB/s "
                     f"(best {report['bandwidth_gbs_best']:.1f}{_probe_note(report)}), matmul of bf16 weights {report['matmul_gflops']:.0f} GFLOP/s"
                     f" in {report.get('matmul_compute_dtype', 'bf16')}")
    rows = [
        ("load time (s)", "load_s", "{:.1f}"),
        ("load peak RSS (GB)", "load_peak_rss_gb", "{:.2f}"),
        ("resident (GB)", "resident_gb", "{:.2f}"),
        ("load peak / resident", "load_peak_ratio", "{:.2f}"),
        ("pre-quantised load (s)", "prequantized_load_s", "{:.1f}"),
        ("pre-quantised peak RSS (GB)", "prequantized_load_peak_rss_gb", "{:.2f}"),
        ("9B resident, est. (GB)", "est_9b_resident_gb", "{:.1f}"),
        ("GPU memory after load (GB)", "gpu_resident_gb", "{:.2f}"),
        ("GPU peak while loading (GB)", "gpu_load_peak_gb", "{:.2f}"),
        ("9B on the GPU, est. (GB)", "est_9b_gpu_gb", "{:.1f}"),
        ("vision s/layer", "vision_s_per_layer", "{:.2f}"),
        ("vision s/image (63 L, extrap.)", "vision_s_per_image", "{:.1f}"),
        ("vision % of matmul peak", "vision_matmul_fraction", "{:.0%}"),
        ("  matmul after each image (GFLOP/s)", "vision_probe_gflops", "{:.0f}"),
        ("  layers % of it (median)", "vision_matmul_fraction_paired", "{:.0%}"),
        ("prefill s/layer", "prefill_s_per_layer", "{:.3f}"),
        ("prefill tok/s (40 L, extrap.)", "prefill_tok_s", "{:.1f}"),
        ("prefill % of matmul peak", "prefill_matmul_fraction", "{:.0%}"),
        ("  matmul after each prefill (GFLOP/s)", "prefill_probe_gflops", "{:.0f}"),
        ("  layers % of it (median)", "prefill_matmul_fraction_paired", "{:.0%}"),
        ("decode ms/layer", "decode_ms_per_layer", "{:.2f}"),
        ("decode tok/s (40 L, extrap.)", "decode_tok_s", "{:.2f}"),
        ("decode % of bandwidth roofline", "decode_roofline_fraction", "{:.0%}"),
        ("  bandwidth after each step (GB/s)", "decode_probe_gbs", "{:.1f}"),
        ("  % of it, step by step (median)", "decode_roofline_fraction_paired", "{:.0%}"),
        ("TTFT image question (s, extrap.)", "ttft_s", "{:.1f}"),
        ("turn-2 TTFT (s, extrap.)", "turn2_ttft_s", "{:.2f}"),
        ("turn-2 / turn-1 TTFT", "turn2_ttft_ratio", "{:.1%}"),
    ]
    formats = list(report["formats"])
    width = 34
    lines.append("")
    lines.append(f"{'':{width}}" + "".join(f"{f:>10}" for f in formats))
    for label, key, fmt in rows:
        cells = []
        for f in formats:
            v = report["formats"][f].get(key)
            cells.append(f"{fmt.format(v):>10}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>10}")
        lines.append(f"{label:{width}}" + "".join(cells))
    o = report.get("decode_overhead")
    if o:
        lines.append("")
        lines.append(f"decode-step overhead (tiny-width model, no matmul cost): {o['per_layer_ms']:.3f} ms per layer "
                     f"({o['per_layer_ms_1_thread']:.3f} on one thread)")
    return "\n".join(lines)
