"""Time of a GPU compile with and without `gpu_build.preload_tensor_intrinsics`, runs alternating, each in
its own process (the import it speeds up happens once per process).

    python bench/compile_gpu.py CONFIG_DIR [--target cuda-sm90] [--runs 2]

CONFIG_DIR: a config-only model folder (`bench/gpu_proof.py --make-configs DIR` writes real-shape Qwen3
ones); compiled with `--no-weights`, so no checkpoint is needed. Prints one line per run. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time

RUNNER = """
import sys
import ferrum_compiler.gpu_build as gpu_build
if sys.argv[1] == "off":
    gpu_build.preload_tensor_intrinsics = lambda: None
from ferrum_runtime.cli import main
sys.exit(main(["compile", sys.argv[2], "--target", sys.argv[3], "--no-weights", "-o", sys.argv[4]]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--target", default="cuda-sm90")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    out = tempfile.mkdtemp() + "/art"
    for run in range(1, args.runs + 1):
        for mode in ("off", "on"):
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", RUNNER, mode, args.config, args.target, out],
                                 capture_output=True, text=True)
            last = (res.stdout + res.stderr).strip().splitlines()[-1]
            print(f"run {run} preload {mode}: {time.perf_counter() - t0:.1f} s wall (rc {res.returncode}); {last}",
                  flush=True)


if __name__ == "__main__":
    main()
