"""The host sampler (CPU artifacts sample on the host) per row: `python bench/host_sampler.py ROOT`, ROOT
a checkout whose ferrum_runtime is timed (run it for two checkouts to compare them). SmolLM2's vocabulary
(49,152), random logits (std 3), 1 and 16 rows; the best of 5 x 20 calls, in µs per row. Not a test."""

import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from ferrum_runtime.sampler import SamplingParams, SequenceSampler, sample
V=49152
rng=np.random.default_rng(0)
logits=(rng.standard_normal((16,V))*3).astype(np.float32)
out=[]
for params in [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7, top_k=40, top_p=0.9)]:
    for B in (1,16):
        seqs=[SequenceSampler(params, [1,2,3], V, sample_index=i) for i in range(B)]
        sample(logits[:B], seqs)
        best=1e9
        for r in range(5):
            n=20; t0=time.perf_counter()
            for _ in range(n): sample(logits[:B], seqs)
            best=min(best,(time.perf_counter()-t0)/n*1e6/B)
        out.append(f"T{params.temperature} p{params.top_p} k{params.top_k} B{B}: {best:.0f}")
print(sys.argv[1], "; ".join(out))
