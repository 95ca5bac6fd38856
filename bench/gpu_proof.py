"""Issue 9's GPU proof in one device call: parity with transformers and speed, for CUDA artifacts compiled
on a machine without a GPU (`bench/gpu_proof.sh` prepares them here and runs this there).

On the GPU machine (torch + transformers + CUDA, TVM's runtime library only, no internet) this script:
1. writes random-weight checkpoints of real shapes with transformers' `save_pretrained` (Qwen3-0.6B and
   Qwen3-4B configs; a GPTQ INT4 g128 copy of the 4B one with tests/gptq.py's writer; two layers of
   Qwen3-30B-A3B, last, for the MoE kernels);
2. fills each `--no-weights` artifact with `ferrum pack-weights` (numpy + safetensors only);
3. parity: a ragged batch (three prompts, chunked prefill, then decode steps) through ferrum on the GPU
   against transformers on the GPU (float32 reference on the same weights); max |logit error|, KL;
4. speed, in the same process and call: HBM read bandwidth (torch copy), ferrum prefill tok/s at 2048
   tokens and decode tok/s at batch 1/4/16/32 (256-token prompts, 128 steps), transformers prefill and
   decode at the same shapes, and batch-1 decode as a fraction of the bandwidth (weight bytes x tok/s / BW);
5. `ferrum serve` (a subprocess, as a user starts it; CUDA graphs as in step 4) on the two Qwen3-4B
   models: one greedy completion over HTTP against the same prompt's tokens from step 4's process, then
   `ferrum bench-serve` at concurrency 1 and 16 (256-token prompts, 128 tokens out); the artifacts get a
   word-level tokenizer over the whole vocabulary first (`write_tokenizer`: the random checkpoints have
   none), so prompts are text and every token is detokenized as a served model's are;
6. writes gpu-proof.json and gpu-proof.md to --out.
The 0.6B model runs twice: float16 (the CUDA default) and bfloat16 (`qwen3-0.6b-bf16`, last).

`--tiny --device cpu` runs the same steps on tiny configs on this CPU (a check of the script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
             max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
             hidden_act="silu", attention_bias=False, torch_dtype="bfloat16")
QWEN3_MOE = dict(QWEN3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                 intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_attention_heads=32,
                 num_key_value_heads=4)
MODELS = {  # name -> (config, GPTQ?)
    "qwen3-0.6b": (dict(QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8), False),
    "qwen3-4b": (dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8), False),
    "qwen3-4b-gptq": (dict(QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8), True),
    # Qwen3-30B-A3B's layers (128 experts, top-8), two of them: the MoE kernels' parity (dispatch, grouped
    # GEMM in prefill, grouped GEMV in decode) and their speed, in a few GB
    "qwen3-moe-2l": (dict(QWEN3_MOE, num_hidden_layers=2), False),
}
# the 0.6B model again, compiled with --dtype bfloat16 (its prefill linears on our tiled tensor-core GEMM:
# dlight has no bfloat16 tensor-core schedule), on the same checkpoint
MODELS["qwen3-0.6b-bf16"] = MODELS["qwen3-0.6b"]
DTYPES = {"qwen3-0.6b-bf16": "bfloat16"}  # compile dtype where not the target's default (float16)
# experiments, not in the default --models: the same models compiled with FERRUM_PDL (every kernel a
# programmatic dependent launch): "-pdl" with FERRUM_PDL=1 (the GEMVs' first weight loads before their wait,
# the next kernel launched first thing), "-pdl-late" (the same loads, the next kernel launched after the
# wait), "-pdl-first" (every kernel waits first; no longer prepared: the wrong logits it was to explain were
# traced in SASS, docs/bench/2026-11-27c-pdl-sass.md, and the 64 MiB a call carries had no room for it),
# "-pdl-deep" (FERRUM_PDL=deep: early, with up to 3 step groups of a one-token GEMV's weights loaded before
# its wait; prepare it with `gpu_proof.sh prepare --models`).
# "-norms" (FERRUM_GEMV_NORMS=1: the decode entries' norms deferred into the GEMVs around them, residual adds
# folded in; its first form, a norm in every reading block's prologue, lost on the H200 on 2026-11-27).
# "-dp4a" (FERRUM_GEMV_DP4A=1, the GPTQ model only): its INT4 decode GEMVs on integer dot products over
# activations rounded to int8 per 32 columns in the GEMV's lanes; "-dp4ak" (FERRUM_GEMV_DP4A=kernel) by a
# quantize kernel before each GEMV (fewer instructions in the GEMV, a launch more).
# "-mma" (FERRUM_MMA_LINEAR=1): decode_wide's float16 and INT4 linears (steps of 17-64 decode tokens) on
# tensor-core mma's that stream each weight once per 16-32 tokens instead of dlight's matmuls; "-mmad"
# (FERRUM_MMA_LINEAR=decode) decode's too (2-16 tokens, instead of the GEMVs' passes of 4).
# "-fa" (FERRUM_FLASH_ATTENTION=1): forward's attention (prefill) in one pass on mma.sync instead of the
# two-pass wmma kernel (bench/gpu_kernels.py times both alone first); "-gemm" (FERRUM_MMA_GEMM=1): forward's
# dense and INT4 linears on the mma.sync GEMM instead of dlight's matmuls (the sweep's gemm-* rows time it).
# "-merged" (FERRUM_MERGED_ATTENTION=1): decode's split attention merges its own splits (the last split block
# of a token and KV head, counted with atomicAdd), no merge kernel; parity says whether the ordering holds.
EXPERIMENT_FLAGS = {"-norms": ("FERRUM_GEMV_NORMS", "1"), "-pdl-late": ("FERRUM_PDL", "late"),
                    "-pdl-first": ("FERRUM_PDL", "first"), "-pdl-deep": ("FERRUM_PDL", "deep"),
                    "-pdl": ("FERRUM_PDL", "1"),
                    "-dp4ak": ("FERRUM_GEMV_DP4A", "kernel"), "-dp4a": ("FERRUM_GEMV_DP4A", "1"),
                    "-mmad": ("FERRUM_MMA_LINEAR", "decode"), "-mma": ("FERRUM_MMA_LINEAR", "1"),
                    "-fa": ("FERRUM_FLASH_ATTENTION", "1"),
                    "-gemm": ("FERRUM_MMA_GEMM", "1"),
                    "-merged": ("FERRUM_MERGED_ATTENTION", "1")}  # a suffix before any it is part of
EXPERIMENTS = tuple(f"{base}{suffix}" for base in ("qwen3-4b", "qwen3-4b-gptq")
                    for suffix in ("-pdl", "-pdl-late", "-norms")) + ("qwen3-4b-gptq-dp4a", "qwen3-4b-gptq-dp4ak",
                                                                     "qwen3-4b-mma", "qwen3-4b-mmad",
                                                                     "qwen3-4b-gptq-mma", "qwen3-4b-gptq-mmad",
                                                                     "qwen3-4b-fa", "qwen3-4b-gptq-fa",
                                                                     "qwen3-4b-fa-gemm", "qwen3-4b-gptq-fa-gemm",
                                                                     "qwen3-4b-merged", "qwen3-4b-gptq-merged")
PARITY_MAX_ABS, PARITY_MAX_KL = 0.1, 1e-3  # passed: 2-4e-2 and 1e-5 (float16/bfloat16 against float32)


def _suffixes(name: str) -> tuple[str, list[str]]:
    """An experiment's base model and its suffixes (``EXPERIMENT_FLAGS``)."""
    found = []
    for suffix in EXPERIMENT_FLAGS:
        if suffix in name:
            name = name.replace(suffix, "")
            found.append(suffix)
    return name, found


def experiment_base(name: str) -> str:
    """The model an experiment is compiled from (its checkpoint is that model's)."""
    return _suffixes(name)[0]


def experiment_env(name: str) -> dict[str, str]:
    """The environment ``ferrum compile`` builds an experiment with."""
    on = {EXPERIMENT_FLAGS[s][0]: EXPERIMENT_FLAGS[s][1] for s in _suffixes(name)[1]}
    return {flag: on.get(flag, "0") for flag, _ in EXPERIMENT_FLAGS.values()}


def without_pdl(name: str) -> str:
    """The model with an experiment's arithmetic: FERRUM_PDL changes none (``-norms-pdl`` -> ``-norms``)."""
    for suffix, (flag, _) in EXPERIMENT_FLAGS.items():  # longest suffix first
        if flag == "FERRUM_PDL":
            name = name.replace(suffix, "")
    return name


MODELS.update({name: MODELS[experiment_base(name)] for name in EXPERIMENTS})


SERVED = ("qwen3-4b", "qwen3-4b-gptq")  # also through `ferrum serve` (step 5)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=512)
TINY_MOE = dict(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2)


def configs(tiny: bool) -> dict[str, tuple[dict, bool]]:
    return {name: (dict(cfg, **TINY, **(TINY_MOE if "num_experts" in cfg else {})) if tiny else cfg, gptq)
            for name, (cfg, gptq) in MODELS.items()}


def gptq_config():
    from ferrum_compiler.quant import GPTQConfig

    return GPTQConfig(4, 128, False, True, True)  # INT4, group 128, no act-order, symmetric, v1 zeros


def make_configs(dest: Path, tiny: bool) -> None:
    """Config-only model directories for `ferrum compile --no-weights` (run where the compiler is)."""
    from tests.gptq import quantization_config

    for name, (cfg, gptq) in configs(tiny).items():
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(cfg, **({"quantization_config": quantization_config(gptq_config())} if gptq else {}))
        (d / "config.json").write_text(json.dumps(cfg, indent=1))


def make_checkpoint(name: str, cfg: dict, gptq: bool, dest: Path, device: str) -> tuple[Path, Path]:
    """(checkpoint to pack, dense checkpoint transformers runs as the reference)."""
    import torch
    import transformers

    name = experiment_base(name)  # the same checkpoint as the model it is an experiment on
    dense = dest / (name.removesuffix("-gptq").removesuffix("-bf16") + "-dense")
    if not (dense / "config.json").is_file():
        torch.manual_seed(0)
        moe = cfg["model_type"] == "qwen3_moe"
        config_cls = transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config
        model_cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
        conf = config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        with torch.device(device):
            model = model_cls(conf).to(torch.bfloat16)
        model.save_pretrained(dense)
        del model
    if not gptq:
        return dense, dense
    from tests.gptq import gptq_checkpoint

    out = dest / name
    if not (out / "config.json").is_file():
        gptq_checkpoint(dense, out, gptq_config(), np.random.default_rng(0))
    return out, out / "dequantized"


def reuse_weights(artifact: Path, packed: Path) -> bool:
    """Give ``artifact`` the weights already packed into ``packed`` (hard links, no copy) when both were
    compiled from the same IR (an experiment and its base: the IR fixes every tensor's packing), with
    the manifest's weights entry and file digests as ``ferrum pack-weights`` would write them. False if
    the IRs differ or ``packed`` has no weights (then pack)."""
    from ferrum_compiler.pack import WEIGHTS_DIR, record_weights
    from ferrum_runtime.artifact import IR_JSON, read_manifest

    if (not (packed / WEIGHTS_DIR).is_dir()
            or (artifact / IR_JSON).read_bytes() != (packed / IR_JSON).read_bytes()):
        return False
    base = read_manifest(packed).data
    if base["weights"].get("pending"):
        return False
    shutil.rmtree(artifact / WEIGHTS_DIR, ignore_errors=True)
    (artifact / WEIGHTS_DIR).mkdir()
    for f in (packed / WEIGHTS_DIR).iterdir():
        os.link(f, artifact / WEIGHTS_DIR / f.name)
    prefix = WEIGHTS_DIR + "/"
    record_weights(artifact, read_manifest(artifact).data, base["weights"],
                   {rel.removeprefix(prefix): d for rel, d in base["files"].items() if rel.startswith(prefix)})
    return True


def pack(artifact: Path, source: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "pack-weights", str(artifact), str(source)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pack-weights {artifact} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


# (reference checkpoint, tokens) -> transformers' last logits: an experiment feeds its base's sequences
# (unless a near-tie flips a greedy token), so its reference costs no second load of the float32 model
_REFERENCE_LOGITS: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}


def parity(model, ref_dir: Path, device: str) -> dict:
    """Ragged batch: prompts of 5, 37 and 100 tokens fed in chunks of up to 32, then 8 decode steps."""
    import torch
    import transformers

    from tests.ragged import chunked_prefill_then_decode

    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(0, model.vocab_size, n)] for n in (5, 37, 100)]
    ours = chunked_prefill_then_decode(model, prompts, 160, rng, steps=4 + 8, chunk=32)
    checked = ours[-9:]  # the last three steps of each sequence
    todo = [tokens for tokens, _ in checked if (str(ref_dir), tuple(tokens)) not in _REFERENCE_LOGITS]
    if todo:
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, torch_dtype=torch.float32).to(device)
        with torch.no_grad():
            for tokens in todo:
                _REFERENCE_LOGITS[str(ref_dir), tuple(tokens)] = ref_model(
                    torch.tensor([tokens], device=device)).logits[0, -1].float().cpu().numpy()
        del ref_model
    worst, kls = 0.0, []
    for tokens, logits in checked:
        ref = _REFERENCE_LOGITS[str(ref_dir), tuple(tokens)]
        worst = max(worst, float(np.abs(logits - ref).max()) if np.isfinite(logits).all() else float("inf"))
        p, q = _log_softmax(ref), _log_softmax(logits.astype(np.float64))
        kls.append(float(np.sum(np.exp(p) * (p - q))))
    return parity_verdict({"max_abs_logit_error": worst, "mean_kl": float(np.mean(kls)), "checks": len(kls),
                           "reference_runs": len(todo)})


def parity_verdict(result: dict) -> dict:
    """``result`` with ``passed``: every logit within ``PARITY_MAX_ABS`` of the reference's and the mean
    KL within ``PARITY_MAX_KL`` (NaN or infinite logits fail). A build that fails has wrong arithmetic or a
    race, and its speeds say nothing (the FERRUM_PDL=1 builds on 2026-11-27: errors of 4.8-6.5, NaN)."""
    kl = result["mean_kl"]
    return {**result, "passed": bool(result["max_abs_logit_error"] <= PARITY_MAX_ABS and np.isfinite(kl)
                                     and kl <= PARITY_MAX_KL)}


def device_picking(model) -> dict:
    """Tokens picked on the device against the same step's logits: the argmax must equal numpy's; the
    sampler (GPU artifacts) must pick the float64 reference's token except within float32 rounding of a
    boundary (schedules/sampling.py)."""
    from ferrum_runtime.bench import _Seqs
    from schedules.sampling import kept_probs_ref, sample_ref

    rng = np.random.default_rng(3)
    rows = 16
    seqs = _Seqs(model, rows, 64)
    seqs.step([[int(t) for t in rng.integers(0, model.vocab_size, 8)] for _ in range(rows)])
    feed = [[int(t)] for t in rng.integers(0, model.vocab_size, rows)]
    lens = list(seqs.lens)
    ids, logits = model.forward_picked(seqs.batch(feed), None, True)
    out = {"argmax_rows": rows, "argmax_mismatches": int((ids != logits.argmax(axis=1)).sum())}
    if model.has_device_sampler:
        seqs.lens = lens  # the same step again, now sampled
        params = np.stack([rng.uniform(0.5, 1.5, rows), rng.choice([0, 1, 20, 1000], rows),
                           rng.choice([1.0, 0.9, 0.5], rows), rng.choice([0.0, 0.05], rows)], axis=1).astype(np.float32)
        uniform = rng.random(rows).astype(np.float32)
        ids, logits = model.forward_picked(seqs.batch(feed), (params, uniform), True)
        ref = sample_ref(logits, params, uniform)
        off = []
        for r in np.flatnonzero(ids != ref):
            cdf = np.cumsum(kept_probs_ref(logits[r], *params[r]))
            off.append(abs(cdf[min(ids[r], ref[r])] / cdf[-1] - uniform[r]))
        out.update(sampled_rows=rows, sampled_mismatches=len(off), mismatch_max_cdf_distance=max(off, default=0.0))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def ferrum_speed(model, tiny: bool, quick: bool = False, digests: dict | None = None) -> dict:
    """Prefill of one 2048-token prompt; decode at batch 1/4/16/32 after 256-token prompts, 128 steps each
    (every sequence decodes to the end, like ignore_eos; greedy tokens picked on the device). Median of 3
    for prefill and batch 1, one pass for the other batches; b1 and b16 again as requests through the
    engine (``bench/engine_host.py``: what serving adds). GPU artifacts: also b1 with the ``decode_one``
    entry point off, b16 through ``decode_wide`` instead of ``decode``, b1/b4/b8 with the ``decode`` entry
    point off and, for CUDA (whose decode steps of up to 16 tokens run as CUDA graphs here), with graphs
    off. ``quick`` (an A/B of an experiment): prefill and the four batches only. ``digests`` gets, per
    decode measure, a digest of every token it decoded (the prompts are the same for every model: an
    experiment that changes no arithmetic must decode its base model's tokens exactly)."""
    from ferrum_runtime.bench import _Seqs

    rng = np.random.default_rng(2)
    n_pp, n_prompt, n_gen = (64, 16, 8) if tiny else (2048, 256, 128)

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, model.vocab_size, n)]

    out: dict[str, float] = {}
    _Seqs(model, 1, 32).step([prompt(16)])  # warm-up
    runs = []
    for _ in range(3):
        seqs, p = _Seqs(model, 1, n_pp + 1), prompt(n_pp)
        t0 = time.perf_counter()
        seqs.step([p])
        runs.append(time.perf_counter() - t0)
    out[f"pp{n_pp}"] = n_pp / float(np.median(runs))

    def decode(b: int, key: str = "") -> float:  # key: digest the tokens under it (the quick measures)
        tokens: list[int] = []
        rate = decode_rate(model, b, n_prompt, n_gen, prompt, tokens=tokens)
        if digests is not None and key:
            digests[key] = token_digest(tokens)
        return rate

    # batch 1, the goal's figure (0.4 s a pass on an H200): the median of 3 passes, each kept
    runs = [decode(1, f"decode b1 pass {i + 1}") for i in range(3)]
    out["decode b1"] = float(np.median(runs))
    out.update({f"decode b1 pass {i + 1}": r for i, r in enumerate(runs)})
    for b in (4, 16, 32):
        out[f"decode b{b}"] = decode(b, f"decode b{b}")
    if quick:
        return out
    # the same decodes as requests through the engine (scheduling, batch building, detokenizing, deltas to
    # an event loop): what serving adds to the model's own steps
    from engine_host import measure  # bench/
    from ferrum_runtime.engine import Engine

    for b in (1, 16):
        out[f"engine decode b{b}"] = measure(model, b, n_prompt, n_gen, 0.0, rng)["decode_tok_s"]
        # paired: the text work of a step's tokens before the next launch (a CPU's order; before 2026-11-27
        # every device's) instead of while it computes
        out[f"engine decode b{b} text first"] = measure(model, b, n_prompt, n_gen, 0.0, rng,
                                                        step=Engine.SERIAL_STEP)["decode_tok_s"]
    if model.decode_one:  # one-token steps through decode (GEMVs in passes of 4 tokens) instead
        model.decode_one = False
        out["decode b1 without decode_one"] = decode(1)
        model.decode_one = True
    if model.decode_max_tokens:  # the same batches through the general entry point (dlight matmuls)
        graph, model.cuda_graph = model.cuda_graph, False
        limit, model.decode_max_tokens = model.decode_max_tokens, 0
        for b in (1, 4, 8):
            out[f"decode b{b} without GEMV entry"] = decode(b)
        model.decode_max_tokens = limit
        if graph:  # the decode entry point launched kernel by kernel
            for b in (1, 4, 8):
                out[f"decode b{b} without CUDA graphs"] = decode(b)
        model.cuda_graph = graph
        out["decode b8"] = decode(8)
        if model.decode_wide and limit >= 16:  # 16 tokens through decode_wide (dlight's matmuls) instead
            model.decode_max_tokens = 8
            out["decode b16 through decode_wide"] = decode(16)
            model.decode_max_tokens = limit
    if model.decode_wide:  # wide decode steps through forward's tensor-core attention instead
        graph, model.cuda_graph = model.cuda_graph, False
        if graph:  # decode_wide launched kernel by kernel
            out["decode b32 without CUDA graphs"] = decode(32)
        model.decode_wide = False
        out["decode b32 without decode_wide"] = decode(32)
        model.decode_wide, model.cuda_graph = True, graph
    return out


def token_digest(tokens: list[int]) -> str:
    import hashlib

    return hashlib.sha1(np.asarray(tokens, np.int64).tobytes()).hexdigest()[:12]


def decode_rate(model, b: int, n_prompt: int, n_gen: int, prompt, sampling: tuple[float, float] | None = None,
                rng: np.random.Generator | None = None, tokens: list[int] | None = None) -> float:
    """Decode tok/s of ``b`` sequences, each prefilled with ``prompt(n_prompt)`` on its own, over ``n_gen``
    steps (every sequence to the end, like ignore_eos). Tokens are greedy, picked on the device as the
    engine picks them, or with ``sampling`` = (top_k, top_p) drawn by the artifact's device sampler at
    temperature 0.7 with uniforms from ``rng``. ``tokens`` gets every decoded token, step by step."""
    from ferrum_runtime.bench import _Seqs

    seqs = _Seqs(model, b, n_prompt + n_gen + 1)
    for i in range(b):
        seqs.step([prompt(n_prompt) if j == i else [] for j in range(b)])
    params = None if sampling is None else np.tile(np.array([[0.7, *sampling, 0.0]], np.float32), (b, 1))
    toks = [1] * b
    t0 = time.perf_counter()
    for _ in range(n_gen):
        if params is None:
            ids = seqs.step([[t] for t in toks], greedy=True)
        else:
            assert rng is not None
            ids, _ = model.forward_picked(seqs.batch([[t] for t in toks]), (params, rng.random(b).astype(np.float32)),
                                          False, check=False)
        toks = [int(t) for t in ids]
        if tokens is not None:
            tokens.extend(toks)
    return b * n_gen / (time.perf_counter() - t0)


def sampled_speed(model, tiny: bool) -> dict:
    """Decode tok/s as ``ferrum_speed``'s, tokens drawn by the artifact's device sampler as chat requests
    usually ask (temperature 0.7, top-p 0.9, and top-k 40 at 16 sequences)."""
    rng = np.random.default_rng(4)
    n_prompt, n_gen = (16, 8) if tiny else (256, 128)

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, model.vocab_size, n)]

    return {"decode b1 sampled (T 0.7, top-p 0.9)": decode_rate(model, 1, n_prompt, n_gen, prompt, (0, 0.9), rng),
            "decode b16 sampled (T 0.7, top-k 40, top-p 0.9)": decode_rate(model, 16, n_prompt, n_gen, prompt,
                                                                           (40, 0.9), rng)}


def transformers_speed(ref_dir: Path, device: str, tiny: bool) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, torch_dtype=torch.float16 if device == "cuda"
                                                              else torch.float32).to(device)
    out: dict[str, float] = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n_pp = 64 if tiny else 2048
    ids = torch.randint(0, model.config.vocab_size, (1, n_pp), device=device)
    with torch.no_grad():
        # warm-up at the full length: the first long forward grows torch's allocator and picks kernels (on the
        # H200 a cold 2048-token forward of Qwen3-4B measured 4.0k tok/s, a warm one up to 43k)
        model(ids)
        runs = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            model(ids)
            sync()
            runs.append(time.perf_counter() - t0)
        out[f"pp{n_pp}"] = n_pp / float(np.median(runs))
        gen = 8 if tiny else 128
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for b in (1, 4, 16, 32):  # decode only: generate(gen) minus generate(1), which is the prefill
            prompt = torch.randint(0, model.config.vocab_size, (b, 256 if not tiny else 16), device=device)
            took = {}
            for n in (1, gen):
                sync()
                t0 = time.perf_counter()
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                sync()
                took[n] = time.perf_counter() - t0
            out[f"decode b{b}"] = b * (gen - 1) / (took[gen] - took[1]) if took[gen] > took[1] else float("nan")
    del model
    return out


def write_tokenizer(artifact: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary into ``artifact`` (unless it has one): bench-serve's
    words first, then ``w<id>``, the last id ``[UNK]``; split on whitespace, decoded joined by spaces. The
    artifact's manifest does not list it (it is added after compiling), and ``ferrum serve`` reads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ferrum_runtime.bench_serve import _WORDS

    if (artifact / "tokenizer.json").is_file():
        return
    vocab = {w: i for i, w in enumerate(dict.fromkeys(_WORDS))}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size - 1)})
    vocab["[UNK]"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(artifact / "tokenizer.json"))


def served_check_tokens(model, tiny: bool) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, greedy tokens, each step's gap between its two largest logits) of one 256-token prompt
    (16 with --tiny) through ``model`` directly, as the engine takes it: the prompt in one call, then one
    token per step. Random weights give near ties: a served token that differs where the gap is ~0 is a
    tie broken the other way by a different summation order, not a wrong token."""
    from ferrum_runtime.bench import _Seqs

    n_prompt, n_gen = (16, 8) if tiny else (256, 32)
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, model.vocab_size, n_prompt)]
    seqs = _Seqs(model, 1, n_prompt + n_gen + 1)
    toks: list[int] = []
    gaps: list[float] = []
    chunk = prompt
    while len(toks) < n_gen:
        row = seqs.step([chunk])[0]
        top2 = np.partition(row, -2)[-2:]
        toks.append(int(np.argmax(row)))
        gaps.append(float(top2[1] - top2[0]))
        chunk = [toks[-1]]
    return prompt, toks, gaps


def serve_speed(artifact: Path, check: tuple[list[int], list[int], list[float]], args) -> dict:
    """``ferrum serve ARTIFACT`` in a subprocess (CUDA graphs as the direct runs had them): the greedy
    completion of ``check``'s prompt against ``check``'s tokens (the text mapped back to ids through the
    artifact's word-level tokenizer; where they first differ, the direct logits' top-2 gap there), then
    ``ferrum bench-serve`` at concurrency 1 and 16. Its log goes to --out."""
    import socket
    import urllib.error
    import urllib.request

    from tokenizers import Tokenizer

    from ferrum_runtime.bench_serve import run_bench_serve, server_process

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, FERRUM_CUDA_GRAPH="0" if args.no_cuda_graph else "1")
    # the KV cache as a user gets it: sized to the GPU's free memory (this process's allocations count)
    cmd = [sys.executable, "-m", "ferrum_runtime.cli", "serve", str(artifact), "--port", str(port)]
    out: dict = {}
    t0 = time.perf_counter()
    log_path = Path(args.out) / f"serve-{artifact.name}.log"
    with server_process(cmd, base, log_path, env=env):
        out["ready_s"] = time.perf_counter() - t0
        out["kv_cache"] = next((line.removeprefix("ferrum: ").strip() for line in log_path.read_text().splitlines()
                                if line.startswith("ferrum: KV cache")), "not logged")
        prompt, want, gaps = check
        body = json.dumps({"model": artifact.name, "prompt": prompt, "max_tokens": len(want), "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                got = json.load(r)["choices"][0]["text"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST /v1/completions: {e.code} {e.read().decode()[:400]}") from None
        served = Tokenizer.from_file(str(artifact / "tokenizer.json")).encode(got).ids
        out["greedy_tokens_equal_direct"] = served == want
        if served != want:
            i = next((i for i, (a, b) in enumerate(zip(served, want)) if a != b), min(len(served), len(want)))
            out["greedy_first_difference"] = {"step": i, "of": len(want), "served_tokens": len(served),
                                              "direct_top2_gap": gaps[i] if i < len(gaps) else None}
        n_prompt, n_gen = (16, 8) if args.tiny else (256, 128)
        result = asyncio.run(run_bench_serve(base, concurrency=[1, 16], input_len=n_prompt, output_len=n_gen,
                                             records_path=str(Path(args.out) / f"serve-{artifact.name}.jsonl")))
        for r in result["results"]:
            c = r["concurrency"]
            out[f"c{c} output tok/s"] = r["output_tok_per_s"]
            out[f"c{c} median TPOT ms"] = r["tpot_ms"]["p50"]
            out[f"c{c} median TTFT ms"] = r["ttft_ms"]["p50"]
            out[f"c{c} errors"] = r["errors"]
    return out


def hbm_bandwidth(device: str) -> float:
    """Bytes per second read+written by a large device copy (2 x size / time), best of 5."""
    import torch

    n = (2 << 30) if device == "cuda" else (256 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def weight_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in (artifact / "weights").glob("*.safetensors"))


def prove(name: str, entry: dict, args, work: Path, bandwidth_gbps: float) -> None:
    """One model's checkpoint, packing, parity, device picking and speeds, filled into ``entry`` as they
    come (a failure keeps what was measured before it)."""
    from ferrum_runtime.model import CompiledModel

    cfg, gptq = configs(args.tiny)[experiment_base(name)]  # an experiment's, combined ones too, is its base's
    artifact = Path(args.artifacts) / name
    t0 = time.perf_counter()
    src, ref = make_checkpoint(name, cfg, gptq, work, args.device)
    entry["checkpoint_s"] = time.perf_counter() - t0
    print(f"{name}: checkpoint {entry['checkpoint_s']:.0f} s", flush=True)
    base = Path(args.artifacts) / experiment_base(name)
    t0 = time.perf_counter()
    if base != artifact and reuse_weights(artifact, base):  # an experiment after its base: the same weights
        entry["weights_from"] = base.name
        print(f"{name}: weights of {base.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    else:
        entry["pack_s"] = pack(artifact, src)
        print(f"{name}: pack-weights {entry['pack_s']:.0f} s", flush=True)
    model = CompiledModel.load(artifact, device=args.device, kv_cache_bytes=(64 << 20) if args.tiny else (8 << 30))
    if "decode_graph" in model.manifest.data["entry_points"] and not args.no_cuda_graph:  # CUDA graphs
        model.cuda_graph = True
    entry["cuda_graph"] = model.cuda_graph
    entry["parity"] = parity(model, ref, args.device)
    print(f"{name}: parity {entry['parity']}", flush=True)
    entry["device_picking"] = device_picking(model)
    print(f"{name}: tokens picked on the device {entry['device_picking']}", flush=True)
    t0 = time.perf_counter()
    entry["ferrum_tokens"] = {}
    entry["ferrum"] = ferrum_speed(model, args.tiny, args.quick, entry["ferrum_tokens"])
    print(f"{name}: ferrum {entry['ferrum']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if model.has_device_sampler and not args.quick:  # its own try: a failure here keeps the transformers peer below
        try:
            entry["ferrum_sampled"] = sampled_speed(model, args.tiny)
            print(f"{name}: ferrum sampled {entry['ferrum_sampled']}", flush=True)
        except Exception:  # noqa: BLE001 - reported in the JSON and the log
            entry["ferrum_sampled_error"] = traceback.format_exc()
            print(f"{name}: sampled decode FAILED\n{entry['ferrum_sampled_error']}", flush=True)
    check = None
    if name in SERVED and not args.no_serve and not args.quick:  # what `ferrum serve` must give for one prompt
        write_tokenizer(artifact, model.vocab_size)
        check = served_check_tokens(model, args.tiny)
    del model
    if check is not None:  # its own try: a failure here keeps the transformers peer below
        try:
            entry["served"] = serve_speed(artifact, check, args)
            print(f"{name}: ferrum serve {entry['served']}", flush=True)
        except Exception:  # noqa: BLE001 - reported in the JSON and the log
            entry["served_error"] = traceback.format_exc()
            print(f"{name}: ferrum serve FAILED\n{entry['served_error']}", flush=True)
    t0 = time.perf_counter()
    entry["transformers"] = {} if args.no_peer or args.quick else transformers_speed(ref, args.device, args.tiny)
    print(f"{name}: transformers {entry['transformers']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    entry["weight_bytes"] = weight_bytes(artifact)
    if "num_experts" not in cfg:  # an MoE step reads only the chosen experts: no such fraction
        entry["batch1_bandwidth_fraction"] = entry["weight_bytes"] * entry["ferrum"]["decode b1"] / (
            bandwidth_gbps * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", default=str(ROOT / ".gpu"), help="folder with one --no-weights artifact per model")
    ap.add_argument("--work", default="/tmp/gpu-proof", help="where checkpoints are written (tens of GB)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a check of this script on any machine)")
    ap.add_argument("--make-configs", help="only write the config-only model folders here (compile side)")
    ap.add_argument("--dtype-of", help="only print the compile dtype of this model (compile side)")
    ap.add_argument("--env-of", help="only print the experiment flags this model is compiled with (compile side)")
    ap.add_argument("--base-of", help="only print the model this one's config is (compile side; an error if none)")
    ap.add_argument("--list-models", action="store_true", help="only print every model, experiments last")
    ap.add_argument("--models", default=",".join(m for m in MODELS if m not in EXPERIMENTS))
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode steps launched kernel by kernel")
    ap.add_argument("--quick", action="store_true",
                    help="an experiment's A/B: parity, device picking, prefill and decode b1/b4/b16/b32 only (no "
                         "variants, sampled decode, engine, serve or transformers)")
    ap.add_argument("--no-serve", action="store_true", help="skip `ferrum serve` + bench-serve on " + ", ".join(SERVED))
    ap.add_argument("--no-peer", action="store_true",
                    help="skip transformers' speed (about a minute per model), e.g. on a rerun in the same session")
    args = ap.parse_args()
    if args.make_configs:
        make_configs(Path(args.make_configs), args.tiny)
        return
    if args.dtype_of:
        print(DTYPES.get(args.dtype_of, ""))
        return
    if args.base_of:  # the config an experiment (or a combination of them) is compiled from
        if experiment_base(args.base_of) not in MODELS:
            sys.exit(f"gpu_proof: no model {args.base_of!r}: a model of {', '.join(MODELS)} with suffixes of "
                     f"{', '.join(EXPERIMENT_FLAGS)}")
        print(experiment_base(args.base_of))
        return
    if args.env_of:
        print(" ".join(f"{k}={v}" for k, v in experiment_env(args.env_of).items()))
        return
    if args.list_models:
        print(" ".join(MODELS))
        return
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "models": {}}
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name()
    report["bandwidth_GBps"] = hbm_bandwidth(args.device) / 1e9
    print(f"bandwidth {report['bandwidth_GBps']:.0f} GB/s", flush=True)
    names = args.models.split(",")
    for name in names:
        entry: dict = {}
        report["models"][name] = entry
        try:  # one model's failure is recorded, and the next one still runs: a device call is precious
            prove(name, entry, args, work, report["bandwidth_GBps"])
        except Exception:  # noqa: BLE001 - reported in the JSON and the log
            entry["error"] = traceback.format_exc()
            print(f"{name}: FAILED\n{entry['error']}", flush=True)
        print(json.dumps({k: v for k, v in entry.items() if k != "error"}, indent=1), flush=True)
        (out / "gpu-proof.json").write_text(json.dumps(report, indent=1))
        # disk: tens of GB each; a base model's are kept while an experiment on it is still to run
        later = [experiment_base(n) for n in names[names.index(name) + 1:]]
        if not args.tiny and (name != experiment_base(name) or name not in later):
            shutil.rmtree(Path(args.artifacts) / name / "weights", ignore_errors=True)
    lines = [f"# GPU proof on {report.get('gpu', args.device)}", "",
             f"HBM copy bandwidth: {report['bandwidth_GBps']:.0f} GB/s (read + write, best of 5)", ""]
    for name, e in report["models"].items():
        if "error" in e:
            lines += [f"## {name}", "", "FAILED (after: " + ", ".join(k for k in e if k != "error") + ")", "",
                      "```", e["error"].strip(), "```", ""]
            continue
        verdict = _passed(e) + ("" if e["parity"].get("passed") else
                                f" (limits {PARITY_MAX_ABS} and {PARITY_MAX_KL}: its speeds below are not comparable)")
        lines += [f"## {name}", "",
                  f"- parity vs transformers fp32: max |logit error| {e['parity']['max_abs_logit_error']:.3g}, "
                  f"mean KL {e['parity']['mean_kl']:.3g} over {e['parity']['checks']} checks: {verdict}",
                  f"- tokens picked on the device vs the same logits: {e['device_picking']}",
                  f"- weights {e['weight_bytes'] / 2**30:.2f} GiB; batch-1 decode at "
                  f"{100 * e.get('batch1_bandwidth_fraction', float('nan')):.0f}% of the copy bandwidth"
                  + (" (MoE: only chosen experts are read, so not comparable)" if "num_experts" in
                     configs(args.tiny)[name][0] else ""),
                  "- ferrum: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in
                                           {**e["ferrum"], **e.get("ferrum_sampled", {})}.items()),
                  "- transformers: " + (", ".join(f"{k} {v:.1f} tok/s" for k, v in e["transformers"].items())
                                        or "not measured (--no-peer or --quick)")]
        if "served" in e:
            lines.append("- ferrum serve: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in e["served"].items()))
        if "served_error" in e:
            lines += ["- ferrum serve: FAILED", "", "```", e["served_error"].strip(), "```"]
        lines.append("")
    lines += experiment_lines(report["models"])
    (out / "gpu-proof.md").write_text("\n".join(lines))
    print("\n".join(lines))


def experiment_lines(models: dict) -> list[str]:
    """Markdown: each experiment's tok/s against its base model's in the same call (both must have run),
    the batch-1 fraction of the copy bandwidth, and in how many decode runs it decoded exactly the tokens
    of the model with its arithmetic (a -pdl model: the same model without FERRUM_PDL, which changes no
    arithmetic, so all of them; a race would show here. Folded norms round differently from the base, so
    there near-ties may flip)."""
    lines: list[str] = []
    for name, e in models.items():
        base = models.get(experiment_base(name))
        if name == experiment_base(name) or base is None or "error" in e or "error" in base:
            continue
        if not lines:
            lines = ["## Experiments against their base (same call)", "",
                     "| experiment | measure | base | experiment | ratio |", "|---|---|---|---|---|"]
        if "parity" in e and "parity" in base:  # a failed experiment's speeds are of wrong arithmetic
            lines.append(f"| {name} | parity | {_passed(base)} | {_passed(e)} | |")
        for key, value in e.get("ferrum", {}).items():
            if key in base.get("ferrum", {}) and base["ferrum"][key]:
                lines.append(f"| {name} | {key} | {base['ferrum'][key]:.1f} | {value:.1f} | "
                             f"{value / base['ferrum'][key]:.3f} |")
        # its tokens against the model with the same arithmetic: -norms-pdl against -norms where that ran
        twin = without_pdl(name)
        if twin == name or not models.get(twin, {}).get("ferrum_tokens"):
            twin = ""
        tokens, twin_tokens = e.get("ferrum_tokens", {}), (models[twin] if twin else base).get("ferrum_tokens", {})
        same = [key for key in tokens if twin_tokens.get(key) == tokens[key]]
        if tokens and twin_tokens:
            lines.append(f"| {name} | decodes {twin or 'its base'}'s tokens | | | {len(same)} of {len(tokens)} |")
        if "batch1_bandwidth_fraction" in e and "batch1_bandwidth_fraction" in base:
            lines.append(f"| {name} | b1 / copy bandwidth | {100 * base['batch1_bandwidth_fraction']:.1f}% | "
                         f"{100 * e['batch1_bandwidth_fraction']:.1f}% | |")
    return lines + [""] if lines else []


def _passed(entry: dict) -> str:
    return "passed" if entry["parity"].get("passed") else "**FAILED**"


if __name__ == "__main__":
    main()
