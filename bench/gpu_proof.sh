#!/usr/bin/env bash
# Issue 9's GPU proof (bench/gpu_proof.py) in one device call.
#
# Here, on the compile machine (nvcc, no GPU), once:
#   bench/gpu_proof.sh prepare
#     writes config-only Qwen3-0.6B / Qwen3-4B / Qwen3-4B-GPTQ / 2-layer Qwen3-30B-A3B folders (and the
#     0.6B again, compiled --dtype bfloat16; the two 4B ones again as experiments: -pdl and -pdl-late
#     with FERRUM_PDL=1 and late, -norms with FERRUM_GEMV_NORMS=1; the GPTQ one as -dp4a and -dp4ak with
#     FERRUM_GEMV_DP4A=1 and kernel), compiles
#     each for cuda-sm90 with `ferrum compile --no-weights` into .gpu/<model> (library, manifest, IR: a few
#     MiB each), packs the runtime-only TVM (../shared/tools/pack-tvm-runtime.sh, ~11 MiB compressed)
#     and the wheels the GPU host lacks into .gpu/, and lists .gpu/ in .git/info/exclude. 51 MiB on
#     2026-11-27, plus 5 MiB of tracked files: at most 64 MiB in all travel. About 5 minutes on 2 cores,
#     compiling $JOBS at a time (default: one per CPU; logs in .gpu/logs/).
#   bench/gpu_proof.sh prepare --models qwen3-4b,qwen3-4b-norms-pdl,...
#     the same for the named models only (any experiment suffixes of gpu_proof.py's EXPERIMENT_FLAGS,
#     combined: -norms-pdl is FERRUM_GEMV_NORMS=1 and FERRUM_PDL=1; -mma / -mmad FERRUM_MMA_LINEAR=1 /
#     decode; -fa FERRUM_FLASH_ATTENTION=1; -gemm FERRUM_MMA_GEMM=1), for an A/B whose artifacts would
#     not all fit the 64 MiB with every default model beside them.
# Then one device call, from the repository root, carrying .gpu:
#   run(command="bash bench/gpu_proof.sh run", carry=[".gpu"], timeout_s=600)
#     installs the runtime-only TVM, writes random-weight checkpoints with transformers, packs them with
#     `ferrum pack-weights`, measures parity and speed, and leaves gpu-proof.json, gpu-proof.md and the
#     log in $OUT. Expected: parity max |logit error| of 1e-3 to 5e-2 (float16 artifact vs float32
#     reference, on an H200 on 2026-11-26: Qwen3-0.6B 5.7e-3, Qwen3-4B 2.2e-2, its GPTQ build 2.4e-2,
#     the 2-layer MoE 2.3e-2; the bfloat16 0.6B 4.2e-2, its mantissa being 3 bits shorter; the ragged batch
#     runs prefill chunks through `forward` and decode steps through `decode_graph`, the GEMV `decode`
#     entry point captured as CUDA graphs), tokens picked on the device
#     equal to numpy's argmax of the same logits (0 mismatches) and sampled ones equal to the float64
#     reference except within ~1e-6 of a boundary, no errors, one tok/s table per model (decode b1/b4/b8
#     also with the `decode` entry point turned off, and with CUDA graphs off; b16/b32 also with CUDA
#     graphs off and without `decode_wide`, i.e. through forward's tensor-core attention).
#     `--models qwen3-4b-pdl,qwen3-4b-gptq-pdl` runs the same proof on the two 4B models compiled with
#     FERRUM_PDL=1 (every kernel a programmatic dependent launch, the GEMVs' first weight loads before
#     their wait, the next kernel launched first thing), `-pdl-late` with FERRUM_PDL=late (the next kernel
#     launched after that wait), `-pdl-first` with FERRUM_PDL=first (every kernel waits first; no early
#     loads; no longer prepared): experiments, not in the default list (FERRUM_PDL=1 failed parity on the
#     H200 on 2026-11-27, since fixed: docs/bench/2026-11-27c-pdl-sass.md; -norms, FERRUM_GEMV_NORMS=1,
#     defers each norm into the GEMVs around it, its first form lost there); their checkpoints
#     are the plain models', and when those ran first in the call so are their packed weights (hard
#     links: the same IR packs the same tensors) and transformers' reference logits for the same tokens,
#     so an experiment costs its load, parity run and timings only (the pack took 16-25 s per 4B model).
#     For an A/B of an experiment, `--quick` keeps parity, device picking, prefill and decode b1 (median of
#     3)/b4/b16/b32 and skips the variants, sampled decode, the engine, serve and transformers, e.g.
#     `run --models qwen3-4b,qwen3-4b-norms,qwen3-4b-pdl-late,qwen3-4b-pdl --quick` (about 90 s for a
#     base and 30 s per experiment on the H200). gpu-proof.md then ends with each experiment against its
#     base (parity passed or **FAILED**: limits 0.1 and 1e-3 in mean KL; tok/s ratios) and in how many decode
#     runs it decoded exactly the base's tokens: a -pdl model must in all of them (its arithmetic is the
#     base's; a race would show here and in parity). A -pdl model whose launches fail (a driver without
#     programmatic launches in graphs) is recorded as failed like any other and the next model runs.
#     If parity fails, rerun with `bash bench/gpu_proof.sh run --no-cuda-graph` to rule the graphs in
#     or out (extra arguments after `run` go to gpu_proof.py, e.g. `--models qwen3-0.6b`; `--no-peer` skips
#     transformers' speed, about 60 s per model). After the direct runs, qwen3-4b and qwen3-4b-gptq are
#     served with `ferrum serve` (a subprocess, CUDA graphs on, the KV cache sized to the GPU as a user gets
#     it, a word-level tokenizer over the vocabulary written into the artifact): one greedy completion over HTTP must equal the direct tokens of the same
#     prompt (`greedy_tokens_equal_direct: true`), then `ferrum bench-serve` at concurrency 1 and 16 (about
#     20-40 s per model; `--no-serve` skips it; server logs and request records in $OUT). A model that
#     fails is recorded (traceback in the JSON and report) and the next one runs. All five took about 345 s of calls on the H200 (qwen3-4b,
#     qwen3-4b-gptq 225-290 s; the other three 120 s); with --no-peer qwen3-4b took 100 s, its GPTQ 120 s.
#   run(command="bash bench/gpu_proof.sh profile --models qwen3-4b", carry=[".gpu"])
#     the same set-up, then bench/gpu_profile.py: device time per kernel of decode steps at 1 and 16
#     sequences and a 2048-token prefill (torch's profiler), gpu-profile.json and .log in $OUT.
#   run(command="bash bench/gpu_proof.sh kernels", carry=[".gpu"])
#     the same set-up, then bench/gpu_kernels.py: each decode GEMV of Qwen3-4B (float16 and INT4) alone,
#     in the layout gemv_layout picks and its alternatives, at 1 and 4 tokens: µs and GB/s of weights
#     read, against the copy bandwidth; then the token pickers over flat and peaked logits rows and one
#     layer's decode attention over key tiles and split counts; gpu-kernels.json and .log in $OUT. On
#     the H200: 21-29 s of call after the machine's start.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  python="${PYTHON:-.venv/bin/python}"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu/configs .gpu/wheels
  "$python" bench/gpu_proof.py --make-configs .gpu/configs --out .gpu
  # the compiles, $JOBS at a time (default: one per CPU; each is one Python process and nvcc), each
  # logged to .gpu/logs/; the GEMV variants (bench/gpu_kernels.py, ~2 min, ~5 MiB) as one more job
  jobs=${JOBS:-$(nproc)} && mkdir -p .gpu/logs
  models=$("$python" bench/gpu_proof.py --list-models --out .gpu)
  if [ "${2:-}" = --models ] && [ -n "${3:-}" ]; then models=${3//,/ }; fi
  for m in $models; do  # a name gpu_proof.py cannot build is an error before any compile starts
    "$python" bench/gpu_proof.py --base-of "$m" --out .gpu > /dev/null
  done
  for m in kernels $models; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    if [ "$m" = kernels ]; then
      "$python" bench/gpu_kernels.py --prepare .gpu/kernels > .gpu/logs/kernels.log 2>&1 &
      continue
    fi
    dtype=$("$python" bench/gpu_proof.py --dtype-of "$m" --out .gpu)  # empty: the target's default
    flags=$("$python" bench/gpu_proof.py --env-of "$m" --out .gpu)  # an experiment's FERRUM_GEMV_NORMS/PDL
    base=$("$python" bench/gpu_proof.py --base-of "$m" --out .gpu)  # an experiment's config is its base's
    env $flags "$python" -m ferrum_runtime.cli compile ".gpu/configs/$base" --target cuda-sm90 \
      --no-weights -o ".gpu/$m" ${dtype:+--dtype "$dtype"} > ".gpu/logs/$m.log" 2>&1 &
  done
  while [ -n "$(jobs -rp)" ]; do wait -n; done  # (set -e: a failed job stops here)
  for m in $models; do
    [ -f ".gpu/$m/ferrum.yaml" ] || { echo "compile of $m failed: .gpu/logs/$m.log" >&2; exit 1; }
  done
  [ -f .gpu/kernels/kernels.json ] || { echo "kernel variants failed: .gpu/logs/kernels.log" >&2; exit 1; }
  rt=$(mktemp -d)
  PYTHON="$python" ../shared/tools/pack-tvm-runtime.sh "$rt/tvm-runtime" 3.12 >/dev/null
  tar czf .gpu/tvm-runtime.tar.gz -C "$rt" tvm-runtime && rm -rf "$rt"
  # packages ferrum's runtime and `ferrum serve` import that a torch/transformers image may lack (sanic and
  # its dependencies, prometheus-client, httpx for bench-serve; ~4 MiB), at the versions the tests ran; not
  # ml_dtypes nor uvloop (9 MiB together): the device image has both, and the working tree that travels,
  # .gpu/ included, must stay within 64 MiB (5 MiB of tracked files, ~51 MiB of .gpu/ on 2026-11-27)
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/wheels "pyyaml==6.0.2" "safetensors==0.5.3" \
    $("$python" -m pip freeze | grep -iE '^(sanic|sanic-routing|tracerite|html5tagger|aiofiles|httptools|websockets|multidict|ujson|prometheus-client|prometheus_client|httpx|httpcore|h11|anyio|idna|certifi|sniffio|typing-extensions|typing_extensions)==')
  du -sh .gpu
  ;;
run|profile|kernels)
  export PYTHONUNBUFFERED=1
  out="${OUT:-/tmp/gpu-proof-out}"; mkdir -p "$out"
  tar xzf .gpu/tvm-runtime.tar.gz -C /tmp
  eval "$(/tmp/tvm-runtime/install.sh)"  # PYTHONPATH with the runtime-only tvm, TVM_USE_RUNTIME_LIB=1
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl 2>/dev/null || true
  for path in /tmp/site/*; do  # the image's own copy of a module wins (torch and transformers ran with it)
    name=$(basename "$path"); mod=${name%%.*}
    case "$name" in *.dist-info|*.data|__pycache__|bin) continue ;; esac
    if python3 -c "import $mod" 2>/dev/null; then rm -rf "$path"; fi
  done
  # and the metadata of each package so removed: on PYTHONPATH it comes before the image's own, and
  # importlib.metadata would report its version (transformers refused the image's safetensors 0.8 as 0.5.3)
  for info in /tmp/site/*.dist-info; do
    [ -f "$info/RECORD" ] || continue
    top=$(cut -d, -f1 "$info/RECORD" | cut -d/ -f1 | grep -v -e '\.dist-info$' -e '^\.\.$' -e '^__pycache__$' | head -1)
    if [ -n "$top" ] && [ ! -e "/tmp/site/$top" ]; then rm -rf "$info"; fi
  done
  # the `ferrum` namespace (ferrum.models, ferrum.schedules) is a package-dir mapping of pyproject.toml; the
  # GPU host runs from the source tree without installing it, so map it with links
  mkdir -p /tmp/ferrum-src/ferrum && ln -sfn "$PWD/models" /tmp/ferrum-src/ferrum/models \
    && ln -sfn "$PWD/schedules" /tmp/ferrum-src/ferrum/schedules
  export PYTHONPATH="$PYTHONPATH:/tmp/site:$PWD:/tmp/ferrum-src"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$out/nvidia-smi.txt"
  if [ "$1" = kernels ]; then
    python3 bench/gpu_kernels.py --run .gpu/kernels --out "$out" 2>&1 | tee "$out/gpu-kernels.log"
  else
    script=$([ "$1" = run ] && echo proof || echo profile)
    python3 "bench/gpu_$script.py" --artifacts .gpu --out "$out" "${@:2}" 2>&1 | tee "$out/gpu-$script.log"
  fi
  ;;
*)
  echo "usage: bench/gpu_proof.sh prepare|run|profile|kernels" >&2; exit 2
  ;;
esac
