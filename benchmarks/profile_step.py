"""Where the time of one optimizer step goes: torch.profiler over three steps of a run, after warm-up.

    python benchmarks/profile_step.py --model /tmp/phi2-random --data-dir DIR --out results/train_profile.txt
    python benchmarks/profile_step.py --model SmolLM2-135M-Instruct.Q4_1.gguf --set data.template=chat \
        --set lora.targets=all-linear --set model.quantization=none --set train.compile=false --out OUT.txt

A --model that does not exist is made as a random-weight phi-2-shaped model; --set gives any config
key (as `phi2 config` lists them), after the defaults and this script's short-run settings.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, make_random_phi2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/phi2-random"))
    parser.add_argument("--data-dir", type=Path, default=ROOT / "examples" / "data" / "xsum-sample")
    parser.add_argument("--profile", default="speed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_profile.txt")
    parser.add_argument("--after", type=int, default=3, help="steps run before the three profiled ones (CUDA "
                        "graphs record a shape the first time it appears: give ~60 to see replays only)")
    parser.add_argument("--sync-debug", action="store_true", help="also list where the profiled steps make the "
                        "host wait for the GPU (torch.cuda.set_sync_debug_mode), with their Python call sites")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed by GPU time (and twice as many by host time)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from phi2cli.config import Phi2Config, apply_overrides
    from phi2cli.training.engine import train

    if not args.model.exists():
        make_random_phi2(args.model)
    work = Path(tempfile.mkdtemp(prefix="phi2-profile-"))
    config = apply_overrides(Phi2Config(), {
        "model.model": str(args.model), "data.data_dir": str(args.data_dir), "data.samples": 8 * (args.after + 4),
        "data.val_samples": 0, "data.max_length": 512, "train.max_steps": args.after + 4, "train.profile": args.profile,
        "train.output_dir": str(work / "run"), "train.final_dir": str(work / "final"), "train.eval_every": 1000,
        **dict(item.partition("=")[::2] for item in args.set),
    }).validate()  # fmt: skip
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])  # fmt: skip

    window: list[float] = []
    plain: list[float] = []  # the ten steps before the profiled ones, without the profiler
    first, last = args.after, args.after + 3

    syncs: collections.Counter[str] = collections.Counter()
    shown = warnings.showwarning

    def note_sync(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings" not in f.filename][-6:]
        syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    class Window(TrainerCallback):  # three steps after allocator and kernel warm-up
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step in (first - 10, first) and first >= 11:
                torch.cuda.synchronize()
                plain.append(time.perf_counter())
            if state.global_step == first:
                torch.cuda.synchronize()
                window.append(time.perf_counter())
                profiler.__enter__()
                if args.sync_debug:
                    warnings.simplefilter("always")
                    warnings.showwarning = note_sync
                    torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == last:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = shown
                torch.cuda.synchronize()
                profiler.__exit__(None, None, None)
                window.append(time.perf_counter())

    result = train(config, callbacks=[Window()])
    averages = profiler.key_averages()
    from torch.autograd import DeviceType

    kernels = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e3 / 3
    host = sum(e.self_cpu_time_total for e in averages) / 1e3 / 3
    unprofiled = f"; {(plain[1] - plain[0]) * 100:.1f} ms per step without it" if len(plain) == 2 else ""
    settings = " ".join(args.set) or "defaults"
    lines = [f"profile {args.profile} ({args.model.name}; {settings}), steps {first + 1}-{last} of 8 examples "
             f"(max {config.data.max_length} tokens), per step:",
             f"GPU kernel time {kernels:.1f} ms per step; host (CPU) time {host:.1f} ms per step; wall time "
             f"{(window[1] - window[0]) * 1e3 / 3:.1f} ms per step (profiler on{unprofiled})", "",
             averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60), "",
             "by host time:",
             averages.table(sort_by="cpu_time_total", row_limit=2 * args.rows, max_name_column_width=60)]  # fmt: skip
    lines += ["", f"the run's own meters (profiled steps included): {result.throughput}", f"timing: {result.timing}"]
    if args.sync_debug:
        lines += ["", f"host waits for the GPU in the profiled steps: {sum(syncs.values())}"]
        lines += [f"{count:5d}  {where}" for where, count in syncs.most_common()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:2]))


if __name__ == "__main__":
    main()
