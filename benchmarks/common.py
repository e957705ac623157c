"""Shared pieces of the benchmarks: a random-weight model of phi-2's exact shape, real XSUM rows."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "examples" / "tiny-phi-2-tokenizer"  # phi-2's real tokenizer and config
BF16_PEAK_TFLOPS = 790.0  # a plain bf16 matrix product on an H200 (measured), the MFU denominator


SEED_JOB = ["--samples", "1495", "--val-samples", "500"]  # the seed job's rows (with --max-steps 625)
# examples/smollm2-xsum.sh's `phi2 train` settings (it adds --template chat for the real model's chat template)
SMOLLM2_JOB = [*SEED_JOB, "--lr", "1e-3", "--lora-targets", "all-linear", "--epochs", "2", "--warmup-steps", "20",
               "--eval-every", "100"]  # fmt: skip


def default_data_dir() -> Path:
    """Real XSUM rows: the shared data folder beside the project (or inside it), else the shipped sample."""
    for candidate in (ROOT.parent / "shared" / "data" / "xsum", ROOT / "shared" / "data" / "xsum"):
        if (candidate / "train.jsonl").is_file():
            return candidate
    return ROOT / "examples" / "data" / "xsum-sample"


def make_random_phi2(out: Path) -> Path:
    """Save a random-weight model of phi-2's exact shape (2.78 B parameters) with its tokenizer."""
    import torch
    from transformers import AutoConfig

    if (out / "config.json").is_file():
        return out
    return save_random_model(AutoConfig.from_pretrained(str(TOKENIZER_DIR)), out, torch.bfloat16)


def save_random_model(config: Any, out: Path, dtype: Any = None) -> Path:
    """Save a random-weight model built from `config` (seed 0) with phi-2's tokenizer files beside it.

    dtype: bf16 on a GPU and fp32 on a CPU unless given; the weights are built on the GPU when there is one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or (torch.bfloat16 if cuda else torch.float32))
    model.save_pretrained(str(out))
    for item in TOKENIZER_DIR.iterdir():
        if item.name != "config.json" and item.suffix != ".md":
            shutil.copy(item, out / item.name)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def matmul_params(model: Any) -> int:
    """Parameters that take part in matrix products (all but the input embedding)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total - embed


def model_flops(params: int, tokens: int, squared_lengths: int, layers: int, hidden: int) -> float:
    """4 x params x tokens (forward + input-gradient backward; frozen base) plus causal attention.

    Attention per sequence of length L and layer: forward 2 L^2 d (QK^T and AV, causal half),
    backward twice that, so 6 L^2 d.
    """
    return 4.0 * params * tokens + 6.0 * squared_lengths * hidden * layers


def shape_params(model_dir: Path) -> tuple[int, Any]:
    """Matrix-product parameters of a model directory, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return matmul_params(model), config


def environment() -> dict[str, Any]:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    info.update(installed_versions("peft", "bitsandbytes", "accelerate"))
    # Python's compiled-bytecode cache: a pip-installed package ships none until first import (or pip's
    # own compile step); without one every process compiles thousands of modules from source.
    # (PYTHONDONTWRITEBYTECODE stops new files being written, not existing ones being read.)
    folder = sys.pycache_prefix or os.environ.get("PYTHONPYCACHEPREFIX")  # the children's (precompile_bytecode)
    info["bytecode_cache"] = {"folder": folder or "__pycache__ beside the sources",
                              "written_on_import": not sys.flags.dont_write_bytecode}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def precompile_bytecode(folder: Path, dirs: list[str] | None = None,
                        dont_write: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Leave Python's bytecode as `pip install` leaves it, where this interpreter would not.

    pip compiles a package's modules once at install. The GPU machine's image sets
    PYTHONDONTWRITEBYTECODE and ships no bytecode, so there every CLI process would compile its
    ~2,300 modules from source again (9.5 s for `phi2 summarize`): a cost no user pays. Here the
    installed packages and this project are compiled once into `folder`, and PYTHONPYCACHEPREFIX
    points the processes this one starts at it. Nothing is done when bytecode is written as usual
    or a cache folder is already set.
    """
    dont_write = sys.flags.dont_write_bytecode if dont_write is None else dont_write
    if not dont_write or sys.pycache_prefix or os.environ.get("PYTHONPYCACHEPREFIX"):
        return {"precompiled": False, "why": "bytecode is written or cached as usual"}
    if dirs is None:
        dirs = [p for p in dict.fromkeys(sys.path) if p and Path(p).is_dir() and Path(p).resolve() != ROOT
                and ("-packages" in p or p in os.environ.get("PYTHONPATH", "").split(os.pathsep))]  # fmt: skip
        dirs.append(str(ROOT / "phi2cli"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPYCACHEPREFIX": str(folder)})  # fmt: skip
    os.environ["PYTHONPYCACHEPREFIX"] = str(folder)
    seconds = round(time.perf_counter() - started, 1)
    return {"precompiled": True, "folder": str(folder), "dirs": dirs, "seconds": seconds}


def patched_python(patch: str, argv: list[str]) -> list[str]:
    """A command line that runs `argv` (a script, or -m module) in a fresh Python after the statements
    `patch` (which may set a phi2cli module's constant, say), so each variant of an A/B is its own process."""
    if argv[0] == "-m":
        run = f"sys.argv = {argv[1:]!r}; runpy.run_module({argv[1]!r}, run_name='__main__', alter_sys=True)"
    else:
        run = f"sys.argv = {argv!r}; runpy.run_path({argv[0]!r}, run_name='__main__')"
    return [sys.executable, "-c", f"import runpy, sys; {patch}{run}"]


def installed_versions(*dists: str) -> dict[str, str | None]:
    """{module name: installed version or None} read from each distribution's metadata (some, such as
    liger-kernel, have no __version__ attribute)."""
    found: dict[str, str | None] = {}
    for dist in dists:
        try:
            found[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist.replace("-", "_")] = None
    return found


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def start_server(adapter: str, env: dict[str, str], socket_path: Path, cwd: Path | None = None,
                 timeout: float = 300) -> tuple[subprocess.Popen, float | None]:  # fmt: skip
    """`phi2 serve --adapter ADAPTER` in a process of its own (output piped), and the seconds until it
    answers on `socket_path`; None when it exited or did not answer within `timeout`."""
    from phi2cli.serving.server import running_status

    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "phi2cli", "serve", "--adapter", adapter], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    while running_status(socket_path) is None:
        if server.poll() is not None or time.perf_counter() - started > timeout:
            return server, None
        time.sleep(0.05)
    return server, round(time.perf_counter() - started, 2)
