"""GGUF sources beyond SmolLM2: a tiny random Llama / Qwen2 written to GGUF with the `gguf` package the
way llama.cpp's converter does (q/k rows permuted for Llama), each tensor type in turn; the compiled
artifact must match transformers loading the same GGUF. K-quants (which the ``gguf`` package cannot make)
are random blocks (tests/kquants.py), mixed per tensor as llama.cpp's Q4_K_M and Q5_K_M files mix them."""

from __future__ import annotations

import numpy as np
import pytest

from ferrum_runtime.model import CompiledModel

from .ragged import RaggedDriver

pytestmark = pytest.mark.model

VOCAB = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("a") + 26)] + ["ab", "abc", "ba"]
# a SentencePiece-style vocabulary: specials, byte fallback pieces, then pieces by falling score
SPM_PIECES = ["\u2581", "\u2581t", "he", "\u2581the", "\u2581th", "in", "\u2581in", "er", "ing", "\u2581a", "th",
              "\u2581thing", "ng", "\u2581s", "is", "\u2581is"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
SPM_VOCAB = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
EXPERTS, EXPERTS_USED, EXPERT_FFN = 4, 2, 32  # qwen3moe: every layer sparse
# a K-quant file's types per tensor (K-quant rows are super-blocks of 256: hidden 256, FFN 512): mostly Q4_K,
# Q6_K for the output and layer 0's v projection, Q5_K for layer 1's down projection (the same shape and
# group as layer 0's Q4_K one: two kernels that differ only in their bits), Q2_K and Q3_K for the o ones,
# IQ4_XS and IQ4_NL for layer 1's gate and up projections (the same format: fused)
K_MIX = {"output.weight": "Q6_K", "blk.0.attn_v.weight": "Q6_K", "blk.1.ffn_down.weight": "Q5_K",
         "blk.0.attn_output.weight": "Q2_K", "blk.1.attn_output.weight": "Q3_K",
         "blk.1.ffn_gate.weight": "IQ4_XS", "blk.1.ffn_up.weight": "IQ4_NL"}
# an IQ file's (llama.cpp's IQ2_XXS and lower mixes): IQ2_XXS but for every other lattice type once, the
# ones of groups of 16 (IQ1_M, IQ2_XS, IQ2_S) each beside one of groups of 32, and the ternary TQ1_0 and
# TQ2_0 for layer 0's gate and up projections (4-bit groups of 32 both: fused)
IQ_MIX = {"default": "IQ2_XXS", "blk.0.attn_v.weight": "IQ2_XS", "blk.1.attn_v.weight": "IQ2_S",
          "blk.0.ffn_down.weight": "IQ3_XXS", "blk.1.ffn_down.weight": "IQ3_S",
          "blk.0.attn_output.weight": "IQ1_S", "blk.1.attn_output.weight": "IQ1_M",
          "blk.0.ffn_gate.weight": "TQ1_0", "blk.0.ffn_up.weight": "TQ2_0"}


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (halves → interleaved pairs), the inverse of what we undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, qtype_name: str, seed: int, tokenizer: str = "gpt2",
               weights: dict[str, np.ndarray] | None = None) -> None:
    """``qtype_name``: one GGUF type for every matrix, ``K_MIX`` (Q4_K, with K_MIX's exceptions), ``IQ_MIX``,
    or ``K_MIX_F32`` / ``IQ_MIX_F32``: the same file (same seed) with each quantized matrix written as
    float32, at the values ferrum's packed form of it holds (``from_gguf(...).dequantize()``: float16
    sub-block scales)."""
    import gguf

    from ferrum_compiler.quant import from_gguf

    from .kquants import random_kquant

    rng = np.random.default_rng(seed)
    mix = qtype_name in ("K_MIX", "K_MIX_F32", "IQ_MIX", "IQ_MIX_F32")
    kinds = IQ_MIX if qtype_name.startswith("IQ_MIX") else {"default": "Q4_K", **K_MIX}
    qtype = getattr(gguf.GGMLQuantizationType, "Q4_K" if mix else qtype_name)
    hidden, ffn = (256, 512) if mix else (HIDDEN, FFN)
    writer = gguf.GGUFWriter(str(path), {"llama-moe": "llama", "qwen2-moe": "qwen2"}.get(arch, arch))
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if arch in ("qwen3moe", "llama-moe", "qwen2-moe"):  # llama-moe: Mixtral; qwen2-moe: metadata only
        writer.add_expert_count(EXPERTS)
        writer.add_expert_used_count(EXPERTS_USED)
        writer.add_expert_feed_forward_length(EXPERT_FFN)
    vocab = VOCAB if tokenizer == "gpt2" else SPM_VOCAB
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(vocab)
    if tokenizer == "gpt2":
        writer.add_token_types([3, 3, 3] + [1] * (len(VOCAB) - 3))
        writer.add_token_merges(["a b", "ab c", "b a"])
    else:
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
        writer.add_token_scores([0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(name, shape, scale=0.3, quantize=True, offset=0.0):
        if quantize and mix:  # random K-quant blocks, in the file's row order like any GGUF's
            kind = kinds.get(name, kinds["default"])
            blocks = random_kquant(rng, kind, *shape, scale / 2)  # as much gain per layer as at hidden 64
            if qtype_name.endswith("_F32"):
                writer.add_tensor(name, from_gguf(kind, blocks, shape).dequantize())
            else:
                writer.add_tensor(name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            return
        w = weights[name] if weights is not None else (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        assert w.shape == shape, (name, w.shape, shape)
        if arch in ("llama", "llama-moe") and name.endswith("attn_q.weight"):
            w = _permute_rows(w, HEADS)
        elif arch in ("llama", "llama-moe") and name.endswith("attn_k.weight"):
            w = _permute_rows(w, KV_HEADS)
        if quantize and qtype not in (gguf.GGMLQuantizationType.F32,):
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)  # element shape follows from the byte shape
        else:
            writer.add_tensor(name, w)

    hd = hidden // HEADS
    tensor("token_embd.weight", (len(vocab), hidden))
    tensor("output_norm.weight", (hidden,), 0.1, quantize=False, offset=1.0)
    tensor("output.weight", (len(vocab), hidden))
    for i in range(LAYERS):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", (hidden,), 0.1, quantize=False, offset=1.0)
        tensor(p + "ffn_norm.weight", (hidden,), 0.1, quantize=False, offset=1.0)
        tensor(p + "attn_q.weight", (HEADS * hd, hidden))
        tensor(p + "attn_k.weight", (KV_HEADS * hd, hidden))
        tensor(p + "attn_v.weight", (KV_HEADS * hd, hidden))
        tensor(p + "attn_output.weight", (hidden, HEADS * hd))
        if arch == "qwen2":
            for n, rows in (("q", HEADS * hd), ("k", KV_HEADS * hd), ("v", KV_HEADS * hd)):
                tensor(p + f"attn_{n}.bias", (rows,), 0.2, quantize=False)
        if arch in ("qwen3moe", "llama-moe"):  # a router (kept float32, as llama.cpp does) and stacked experts
            if arch == "qwen3moe":  # qk-norm
                tensor(p + "attn_q_norm.weight", (hd,), 0.1, quantize=False, offset=1.0)
                tensor(p + "attn_k_norm.weight", (hd,), 0.1, quantize=False, offset=1.0)
            tensor(p + "ffn_gate_inp.weight", (EXPERTS, hidden), 0.5, quantize=False)
            tensor(p + "ffn_gate_exps.weight", (EXPERTS, EXPERT_FFN, hidden))
            tensor(p + "ffn_up_exps.weight", (EXPERTS, EXPERT_FFN, hidden))
            tensor(p + "ffn_down_exps.weight", (EXPERTS, hidden, EXPERT_FFN))
            continue
        tensor(p + "ffn_gate.weight", (ffn, hidden))
        tensor(p + "ffn_up.weight", (ffn, hidden))
        tensor(p + "ffn_down.weight", (hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,qtype", [("llama", "F32"), ("llama", "F16"), ("llama", "BF16"), ("llama", "Q8_0"),
                                        ("llama", "Q4_0"), ("qwen2", "Q4_1"), ("qwen2", "Q5_1"),
                                        ("qwen3moe", "F32"), ("qwen3moe", "Q4_1")])
def test_gguf_artifact_matches_transformers(arch, qtype, tmp_path, compiled):
    """Each architecture and tensor type against transformers loading the same file. A MoE file (qwen3moe)
    has its experts (3-D stacks) split expert by expert, packed when quantized; transformers is told
    ``norm_topk_prob`` (the file has no key for it; llama.cpp's qwen3moe
    graph renormalises the top-k router weights, and so does ours) and the experts' width (its GGUF loader
    does not read ``expert_feed_forward_length``)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{arch}-{qtype}.gguf"
    write_gguf(path, arch, qtype, seed=len(qtype) + len(arch))
    model = CompiledModel.load(compiled(path, kv_dtype="float32"), num_blocks=8)  # the GGUF's numbers, unrounded
    extra = {"norm_topk_prob": True, "moe_intermediate_size": EXPERT_FFN} if arch == "qwen3moe" else {}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                              **extra).eval()
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(0, len(VOCAB), 19)]
    ours = RaggedDriver(model, 1, 32, rng).step([prompt], all_rows=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    # INT4 linears (and symmetric INT8 ones on AVX-512 VNNI) run the integer-dot CPU kernel, which rounds
    # activations to 16 bits per group (1.5e-5 of the group's largest value; its per-linear bound is tested
    # in test_quant_linear): through the model that moves logits by up to a few 1e-4 of their range. Float
    # formats must agree to 1e-3.
    tol = 1e-3 * max(1.0, float(np.abs(ref).max())) if qtype not in ("F32", "F16", "BF16") else 1e-3
    print(f"{arch} {qtype}: max |logit error| {np.abs(ours - ref).max():.2e}, tolerance {tol:.2e}")
    assert np.abs(ours - ref).max() <= tol


@pytest.mark.parametrize("target", ["cpu", "cpu-x86-64-v3"])
def test_k_quant_gguf_stays_packed_and_matches_transformers(tmp_path, compiled, target):
    """A Q4_K_M-like file (Q2_K to Q6_K, IQ4_XS and IQ4_NL matrices, a K-quant embedding) compiles with
    every matrix kept packed (4-bit groups of 32, 8-bit groups of 32 and 16; q|k fused beside a Q6_K v,
    gate|up from two types), and runs as
    transformers runs the same weights as the artifact holds them (float16 sub-block scales: a float32
    twin of the file). Against the K-quant file itself, the scales' rounding (weights within 2.6e-4 of
    their norm, test_quant_linear) moves these random logits by a few 1e-3 of their range. For this host
    and for AVX2 (``cpu-x86-64-v3``: its own int8 products), every matrix on the integer-dot kernel where
    the host has one."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from ferrum_runtime.artifact import host_cpu_flags

    if target == "cpu-x86-64-v3" and "avx2" not in host_cpu_flags():
        pytest.skip("this CPU has no AVX2")
    path = tmp_path / "kmix.gguf"
    write_gguf(path, "llama", "K_MIX", seed=5)
    (tmp_path / "twin").mkdir()
    write_gguf(tmp_path / "twin" / "kmix.gguf", "llama", "K_MIX_F32", seed=5)
    art = compiled(path, target, kv_dtype="float32")
    manifest = yaml.safe_load((art / "ferrum.yaml").read_text())
    assert manifest["quantization"]["dense_weights"] == [] and manifest["quantization"]["method"] == "gguf"
    assert manifest["source"]["name"] == str(path)  # not the last tensor's name (a loop variable shadowed it)
    formats = _formats(manifest)
    assert formats["lm_head.weight"] == (8, 16, True) and formats["model.embed_tokens.weight"] == (4, 32, False)
    assert formats["model.layers.0.self_attn.q_proj+k_proj.weight"] == (4, 32, False)
    assert formats["model.layers.0.self_attn.v_proj.weight"] == (8, 16, True)
    assert formats["model.layers.1.self_attn.q_proj+k_proj+v_proj.weight"] == (4, 32, False)
    assert formats["model.layers.1.mlp.down_proj.weight"] == (8, 32, False)
    assert formats["model.layers.0.mlp.down_proj.weight"] == (4, 32, False)
    r16 = bool({"avx2", "avx512_vnni"} & set(host_cpu_flags()))  # 4-bit groups of 16, value tables: r16 only
    assert formats["model.layers.0.self_attn.o_proj.weight"] == (4 if r16 else 8, 16, False)  # Q2_K
    assert formats["model.layers.1.self_attn.o_proj.weight"] == (4 if r16 else 8, 16, True)  # Q3_K
    # IQ4_XS beside IQ4_NL: codes of their one table
    assert formats["model.layers.1.mlp.gate_proj+up_proj.weight"] == ((4, 32, True, "table") if r16 else (8, 32, True))
    if r16:  # every matrix but the INT4 table: the r16 layout
        layouts = {w: f.get("layout") for w, f in manifest["quantization"]["weights"].items()}
        assert {w for w, lay in layouts.items() if lay != "r16"} == {"model.embed_tokens.weight"}, layouts
    model = CompiledModel.load(art, num_blocks=8)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, len(VOCAB), 19)]
    ours = RaggedDriver(model, 1, 32, np.random.default_rng(1)).step([prompt], all_rows=True)
    for where, tol in ((tmp_path / "twin", 1e-3), (tmp_path, 1e-2)):
        hf = AutoModelForCausalLM.from_pretrained(str(where), gguf_file="kmix.gguf", dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(ours - ref).max() <= tol * max(1.0, float(np.abs(ref).max())), where


def _formats(manifest: dict) -> dict[str, tuple]:
    """``{weight: (bits, group size, sym[, "table"])}`` of an artifact's quantized weights."""
    return {w: (f["bits"], f["group_size"], f["sym"]) + (("table",) if f.get("table") else ())
            for w, f in manifest["quantization"]["weights"].items()}


def test_iq_gguf_stays_packed_and_matches_transformers(tmp_path, compiled):
    """An IQ2_XXS-like file with every lattice type (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S)
    and the ternary ones (TQ1_0, TQ2_0) compiles with every matrix kept packed: all but IQ3_S as 4-bit codes
    of their value tables in groups of 32 or 16 where the integer-dot kernel runs (their values in 8 bits
    in the embedding table and elsewhere), IQ3_S and the ternary types as 4-bit groups; and runs as
    transformers runs the weights the artifact holds (a float32 twin of the file), then within the scales'
    float16 rounding of the file itself."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    path = tmp_path / "iqmix.gguf"
    write_gguf(path, "llama", "IQ_MIX", seed=6)
    (tmp_path / "twin").mkdir()
    write_gguf(tmp_path / "twin" / "iqmix.gguf", "llama", "IQ_MIX_F32", seed=6)
    art = compiled(path, "cpu", kv_dtype="float32")
    manifest = yaml.safe_load((art / "ferrum.yaml").read_text())
    assert manifest["quantization"]["dense_weights"] == []
    formats = _formats(manifest)
    from ferrum_runtime.artifact import host_cpu_flags

    r16 = bool({"avx2", "avx512_vnni"} & set(host_cpu_flags()))
    coded, coded16 = ((4, 32, True, "table"), (4, 16, True, "table")) if r16 else ((8, 32, True), (8, 16, True))
    assert formats["lm_head.weight"] == coded and formats["model.embed_tokens.weight"] == (8, 32, True)
    for i, (v, o) in enumerate(((coded16, coded), (coded16, coded16))):  # IQ2_XS / IQ1_S, IQ2_S / IQ1_M
        assert formats[f"model.layers.{i}.self_attn.q_proj+k_proj.weight"] == coded
        assert formats[f"model.layers.{i}.self_attn.v_proj.weight"] == v
        assert formats[f"model.layers.{i}.self_attn.o_proj.weight"] == o
        assert formats[f"model.layers.{i}.mlp.down_proj.weight"] == (coded, (4, 32, False))[i]  # IQ3_XXS, IQ3_S
    assert formats["model.layers.0.mlp.gate_proj+up_proj.weight"] == (4, 32, False)  # TQ1_0 beside TQ2_0
    model = CompiledModel.load(art, num_blocks=8)
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, len(VOCAB), 19)]
    ours = RaggedDriver(model, 1, 32, np.random.default_rng(2)).step([prompt], all_rows=True)
    for where, tol in ((tmp_path / "twin", 1e-3), (tmp_path, 1e-2)):
        hf = AutoModelForCausalLM.from_pretrained(str(where), gguf_file="iqmix.gguf", dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        assert np.abs(ours - ref).max() <= tol * max(1.0, float(np.abs(ref).max())), where


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_mixtral_gguf_matches_transformers(qtype, tmp_path, compiled):
    """A Mixtral GGUF (a ``llama`` file with expert stacks) written from a transformers Mixtral the way
    llama.cpp's converter writes one (q/k rows permuted, each projection's experts stacked in one 3-D
    tensor, the router ``ffn_gate_inp``), against that model: transformers' GGUF loader does not read
    Mixtral files. Q8_0: the experts and other matrices packed (the router stays float32), against the
    same model holding the file's rounded weights."""
    import shutil

    import gguf
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    cfg = MixtralConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=EXPERT_FFN,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                        num_local_experts=EXPERTS, num_experts_per_tok=EXPERTS_USED, rms_norm_eps=1e-5,
                        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # weights as large as write_gguf's random ones: decisive routing, logits of a few units
        for n, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if n.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")  # the checkpoint names llama.cpp's converter reads
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    weights = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        hp, moe = f"model.layers.{i}.", f"model.layers.{i}.block_sparse_moe."
        for gguf_name, hf_name in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                                   ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                   ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj")):
            weights[f"blk.{i}.{gguf_name}.weight"] = sd[hp + hf_name + ".weight"]
        weights[f"blk.{i}.ffn_gate_inp.weight"] = sd[moe + "gate.weight"]
        for stack, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            weights[f"blk.{i}.ffn_{stack}_exps.weight"] = np.stack(
                [sd[f"{moe}experts.{e}.{w}.weight"] for e in range(EXPERTS)])
    path = tmp_path / f"mixtral-{qtype}.gguf"
    write_gguf(path, "llama-moe", qtype, seed=0, weights=weights)
    if qtype != "F32":  # every matrix but the router rounded as write_gguf rounds it (rows in any order)
        t = gguf.GGMLQuantizationType[qtype]
        rounded = {n: w if n.endswith("norm.weight") or n.endswith("moe.gate.weight")
                   else gguf.quants.dequantize(gguf.quants.quantize(w, t), t).astype(np.float32) for n, w in sd.items()}
        (tmp_path / "rounded").mkdir()
        shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "rounded")
        save_file(rounded, tmp_path / "rounded" / "model.safetensors", metadata={"format": "pt"})
        hf = MixtralForCausalLM.from_pretrained(tmp_path / "rounded", dtype=torch.float32).eval()
    art = compiled(path, kv_dtype="float32")
    model = CompiledModel.load(art, num_blocks=8)
    assert model.manifest.model["family"] == "mixtral"
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, len(VOCAB), 19)]
    ours = RaggedDriver(model, 1, 32, np.random.default_rng(1)).step([prompt], all_rows=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    # Q8_0 matrices take the integer-dot kernel (activations rounded to 16 bits) on AVX-512 VNNI and AVX2
    tol = (1e-4 if qtype == "F32" else 1e-3) * max(1.0, float(np.abs(ref).max()))
    print(f"mixtral {qtype}: max |logit error| {np.abs(ours - ref).max():.2e}, tolerance {tol:.2e}")
    assert np.abs(ours - ref).max() <= tol


def test_moe_gguf_of_another_architecture_is_refused_in_one_line(tmp_path):
    from .test_cli import assert_one_line_error, ferrum

    path = tmp_path / "qwen2moe.gguf"
    write_gguf(path, "qwen2-moe", "F32", seed=2)
    assert_one_line_error(ferrum("compile", path, "-o", tmp_path / "out"), "'qwen2'", "Mixtral", "qwen3moe")


@pytest.mark.parametrize("text", ["the thing is", " leading space", "in  the\nthing", "ü€ byte fallback 😀", "",
                                  "<s>the</s>", "thththe"])
def test_sentencepiece_gguf_tokenizer_matches_transformers(text, tmp_path_factory):
    """A `llama` (SentencePiece) GGUF: merges from scores, byte fallback, prefix space."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from ferrum_compiler.frontend import open_source
    from ferrum_runtime.tokenizer import TokenizerFiles

    root = tmp_path_factory.getbasetemp() / "spm"
    path = root / "spm.gguf"
    if not path.exists():
        root.mkdir(exist_ok=True)
        write_gguf(path, "llama", "F32", 0, tokenizer="llama")
        open_source(str(path)).write_tokenizer(root)
    ours = Tokenizer.from_file(str(root / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(root), gguf_file=path.name)
    expected = ref.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_special_tokens=False).ids == expected
    # BOS: llama.cpp prepends it to SentencePiece prompts unless the file says otherwise; so do we
    # (transformers' GGUF loader sets add_bos_token in its config but does not add it), once
    assert TokenizerFiles(root).encode(text) == (expected if expected[:1] == [1] else [1] + expected)
    assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=True)
