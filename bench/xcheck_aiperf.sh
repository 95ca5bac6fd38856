#!/bin/bash
# Cross-check `ferrum bench-serve` against NVIDIA's aiperf on the same `ferrum serve` (issue 8: "the figures
# agree"). Not a test, and it installs nothing: aiperf lives in its own venv (pip install aiperf), named by
# $AIPERF. On a 2-vCPU machine aiperf's own processes use most of a core, so the server is pinned to CPU 0
# with one thread and both clients to CPU 1; each client gets a fresh server (no prefix-cache reuse
# between runs) and the same load: ~256 tokens in, 128 out (ignore_eos), greedy, streamed /v1/completions.
#
#   AIPERF=/path/to/venv/bin/aiperf bench/xcheck_aiperf.sh ARTIFACT OUT_DIR [CONCURRENCY] [REQUESTS]
set -e
ART=$1; OUT=$2; C=${3:-4}; N=${4:-16}; PORT=8560
AIPERF=${AIPERF:-aiperf}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FERRUM=${FERRUM:-ferrum}
mkdir -p "$OUT"
start() {
  FERRUM_NUM_THREADS=1 taskset -c 0 "$FERRUM" serve "$ART" --port $PORT >> "$OUT/xcheck-server.log" 2>&1 &
  SP=$!
  for _ in $(seq 120); do [ "$(curl -s -o /dev/null -w '%{http_code}' localhost:$PORT/v1/models)" = 200 ] && break; sleep 1; done
  MODEL=$(curl -s localhost:$PORT/v1/models | python3 -c "import json,sys; print(json.load(sys.stdin)['data'][0]['id'])")
}
cd "$ROOT"
for round in 1 2; do
  start
  /usr/bin/time -f "bench-serve cpu %U+%S s wall %e s" taskset -c 1 "$FERRUM" bench-serve http://127.0.0.1:$PORT \
    --concurrency "$C" --input-len 256 --output-len 128 --num-prompts "$N" --json \
    > "$OUT/xcheck-bench-serve-$round.json" 2>> "$OUT/xcheck-time.txt"
  kill $SP; wait $SP || true
  start
  rm -rf "$OUT/aiperf-$round"
  /usr/bin/time -f "aiperf cpu %U+%S s wall %e s" taskset -c 1 "$AIPERF" profile --model "$MODEL" \
    --url http://127.0.0.1:$PORT --endpoint-type completions --streaming --concurrency "$C" --request-count "$N" \
    --isl 256 --isl-stddev 0 --osl 128 --osl-stddev 0 --tokenizer "$ART" --extra-inputs ignore_eos:true \
    --extra-inputs min_tokens:128 --extra-inputs temperature:0 --artifact-dir "$OUT/aiperf-$round" \
    > "$OUT/xcheck-aiperf-$round.txt" 2>> "$OUT/xcheck-time.txt"
  kill $SP; wait $SP || true
done
