"""Write real GPTQ-format tensors (AutoGPTQ / transformers layout) for tests: ``qweight [K/pack, N]``
int32, ``qzeros [groups, N/pack]`` int32 (v1 stores zero - 1), ``scales [groups, N]`` float16, ``g_idx [K]``
int32 (a random column permutation when ``desc_act``), and the ``quantization_config`` that goes with
them. The quantization is plain round-to-nearest; only the format matters here."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ferrum_compiler.quant import GPTQConfig


def _pack_int32(vals: np.ndarray, bits: int, axis: int) -> np.ndarray:
    per = 32 // bits
    v = np.moveaxis(vals.astype(np.uint32), axis, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    out = np.zeros((v.shape[0], *v.shape[2:]), np.uint32)
    for j in range(per):
        out |= v[:, j] << np.uint32(j * bits)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int32)  # save_file writes raw memory


def gptq_pack(w: np.ndarray, cfg: GPTQConfig, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """GPTQ tensors for ``w[N, K]`` and the float32 weights they dequantize to."""
    n, k = w.shape
    g = k if cfg.group_size == -1 else cfg.group_size
    groups = k // g
    g_idx = np.arange(k) // g
    if cfg.desc_act:
        g_idx = g_idx[rng.permutation(k)]
    maxq = (1 << cfg.bits) - 1
    scales = np.zeros((groups, n), np.float32)
    zeros = np.zeros((groups, n), np.int64)
    for gi in range(groups):
        cols = w[:, g_idx == gi]
        if cfg.sym:
            s = np.maximum(np.abs(cols).max(1), 1e-6) * 2 / maxq
            z = np.full(n, (maxq + 1) // 2)
        else:
            lo, hi = cols.min(1), cols.max(1)
            s = np.maximum(hi - lo, 1e-6) / maxq
            z = np.clip(np.rint(-lo / s), 0, maxq)
        scales[gi] = s.astype(np.float16).astype(np.float32)
        zeros[gi] = z
    s_k, z_k = scales[g_idx].T, zeros[g_idx].T.astype(np.float32)  # [N, K]; the zeros are small integers
    q = np.clip(np.rint(w / s_k + z_k), 0, maxq)
    deq = s_k * (q - z_k)
    stored_z = zeros - (1 if cfg.v1_zeros else 0)
    if cfg.v1_zeros:
        stored_z = stored_z & maxq  # AutoGPTQ v1 wraps zero - 1 into the bit field
    tensors = {"qweight": _pack_int32(q.T, cfg.bits, 0), "qzeros": _pack_int32(stored_z, cfg.bits, 1),
               "scales": scales.astype(np.float16), "g_idx": g_idx.astype(np.int32)}
    return tensors, deq


def quantization_config(cfg: GPTQConfig) -> dict:
    return {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act,
            "sym": cfg.sym, "checkpoint_format": "gptq" if cfg.v1_zeros else "gptq_v2"}


def gptq_checkpoint(src: Path, dest: Path, cfg: GPTQConfig, rng: np.random.Generator,
                    skip: tuple[str, ...] = ("embed_tokens", "lm_head", "norm", "mlp.gate.")) -> Path:
    """Copy an fp32 HF checkpoint into a GPTQ one: every 2-D linear weight not matching ``skip`` becomes
    qweight/qzeros/scales/g_idx. Writes ``dest/dequantized`` too: the same model with the weights the
    GPTQ tensors decode to, for transformers to run as the reference."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy loader needs
    from safetensors.numpy import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dequantized").mkdir(exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out, deq = {}, {}
    linear = [n for n, t in tensors.items() if n.endswith(".weight") and t.ndim == 2 and not any(s in n for s in skip)]
    # one generator per matrix, drawn in order: the same result for any thread count
    rngs = dict(zip(linear, rng.spawn(len(linear))))
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy releases the GIL: real-shape models in minutes
        packed = pool.map(lambda n: gptq_pack(tensors[n].astype(np.float32), cfg, rngs[n]), linear)
        for name, (tens, w) in zip(linear, packed):
            prefix = name[: -len(".weight")]
            out.update({f"{prefix}.{k}": v for k, v in tens.items()})
            deq[name] = w
    for name, t in tensors.items():
        if name not in rngs:
            out[name] = t
            deq[name] = t
    save_file(out, str(dest / "model.safetensors"))
    save_file(deq, str(dest / "dequantized" / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (dest / "dequantized" / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = quantization_config(cfg)
    (dest / "config.json").write_text(json.dumps(config))
    return dest
