#!/bin/bash
# ferrum serve with its CPU default (3 drafts) vs --speculative-tokens 0, bench-serve's random-word prompts
# (256 in, 128 out, ignore_eos): A B A B, one server at a time.
cd /work/main
OUT=${OUT:-/tmp/spec/serve}
for round in 1 2; do
  for k in 3 0; do
    .venv/bin/ferrum serve /tmp/sm2 --port 8123 --speculative-tokens $k > $OUT/server-k$k-r$round.log 2>&1 &
    pid=$!
    for i in $(seq 60); do curl -sf http://127.0.0.1:8123/health > /dev/null && break; sleep 1; done
    .venv/bin/ferrum bench-serve http://127.0.0.1:8123 --concurrency 1,4,16 --num-prompts 32 --json > $OUT/k$k-r$round.json 2> $OUT/k$k-r$round.err
    curl -s http://127.0.0.1:8123/metrics | grep spec_decode | grep -v '^#' > $OUT/k$k-r$round.metrics
    kill -TERM $pid; wait $pid
  done
done
