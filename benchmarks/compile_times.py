"""Run one phi2 command in this process, then print where torch.compile spent its time (benchmarks/results/compile_pays.json)."""
import sys
import time

from phi2cli.cli.app import app

started = time.perf_counter()
try:
    app(sys.argv[1:])
except SystemExit as done:
    print("exit", done.code, "after %.1f s" % (time.perf_counter() - started))
from torch._dynamo.utils import compile_times  # noqa: E402

print(compile_times(repr="str", aggregate=True))
