"""The ``ferrum`` console script: compile, pack-weights, inspect, run, serve, bench, bench-serve.

Only ``compile`` imports the compiler (lazily, inside its handler); ``pack-weights`` imports the
compiler's numpy-only weight writer, not TVM; every other command runs on TVM's runtime library alone. Errors a user can fix print as one line naming the fix; a traceback is shown
only with FERRUM_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .aliases import alias_names
from .env import DEBUG
from .errors import FerrumError

if TYPE_CHECKING:
    from .speculative import SpeculativeConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferrum", description="Compile LLMs ahead of time with TVM and run them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model into an artifact directory")
    c.add_argument("model", help="HF directory, Hub repo id (Qwen/Qwen3-0.6B), .gguf file, or alias (smollm2)")
    c.add_argument("--target", default="cpu",
                   help="cpu (this machine), cpu-x86-64-v3, cpu-x86-64-v4, cuda-sm80/86/89/90, metal (default: cpu)")
    c.add_argument("-o", "--output", help="artifact directory (default: artifacts/<model name>)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="weights and activations (default: float32 on cpu, float16 on GPUs)")
    c.add_argument("--quant", choices=("auto", "none", "q4", "q8"), default="auto",
                   help="weights: auto keeps the source's GPTQ/GGUF quantization packed (default), none "
                        "dequantizes it, q4/q8 quantize the dense linears round-to-nearest (INT4 group 128 / INT8 group 32; embeddings and lm_head stay dense)")
    c.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens (default: 16)")
    c.add_argument("--kv-dtype", choices=("float16", "bfloat16", "float32"),
                   help="KV cache element type (default: float16, or bfloat16 for bfloat16 models); float16 "
                        "halves the bytes attention reads and doubles the tokens a cache holds")
    c.add_argument("--act-bits", type=int, choices=(8, 16), default=16,
                   help="CPU INT4 linears: round activations per weight group to 16 bits (within 1.5e-5 of the "
                        "float result) or 8 bits (llama.cpp's Q8 activations: half the integer dot products, "
                        "faster, less accurate) (default: 16)")
    c.add_argument("--no-weights", action="store_true",
                   help="build the library, manifest, tokenizer and IR only (the model directory may hold just "
                        "config.json and tokenizer files); add the weights later with `ferrum pack-weights`")
    c.add_argument("--dump-ir", action="store_true",
                   help="also write the IR after every pass and the Relax module to <artifact>/debug/")

    pw = sub.add_parser("pack-weights", help="write the weights of an artifact compiled with --no-weights "
                                             "(numpy and safetensors only: runs where TVM's compiler is absent)")
    pw.add_argument("artifact", help="the artifact directory")
    pw.add_argument("model", help="the HF directory, Hub repo id or .gguf file it was compiled from")

    s = sub.add_parser("serve", help="serve an artifact over the OpenAI HTTP API")
    s.add_argument("artifact", help="an artifact directory, or an alias (smollm2) compiled once and cached")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: open)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the artifact's folder name)")
    s.add_argument("--kv-cache-memory", type=int, metavar="MIB",
                   help="KV cache budget (default: on CUDA GPUs 90%% of the memory less the weights and 1 GiB; "
                        "512 elsewhere)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded at once (default: 64)")
    s.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens per engine step (default: 2048 on GPUs, 512 on CPUs)")
    s.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix reuse off")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond --max-num-seqs before 429 + Retry-After (default: 256)")
    s.add_argument("--cors", action="store_true", help="send Access-Control-Allow-Origin: * (default: off)")
    s.add_argument("--speculative-tokens", type=int, metavar="N", help=SPECULATIVE_HELP)
    s.add_argument("--disable-thinking", action="store_true", help=THINKING_HELP + "; a request's "
                   "chat_template_kwargs.enable_thinking overrides it")

    i = sub.add_parser("inspect", help="print an artifact's manifest and IR summary")
    i.add_argument("artifact")
    i.add_argument("--ir", action="store_true", help="print the whole IR, not only a summary")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    r = sub.add_parser("run", help="generate from a prompt, or chat in the terminal")
    r.add_argument("artifact", help="an artifact directory, or an alias (smollm2) compiled once and cached")
    r.add_argument("--prompt", help="answer this one prompt and exit (default: interactive chat)")
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--raw", action="store_true", help="do not apply the chat template to --prompt")
    r.add_argument("--speculative-tokens", type=int, metavar="N", help=SPECULATIVE_HELP)
    r.add_argument("--disable-thinking", action="store_true", help=THINKING_HELP)

    def ints(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
        return values

    b = sub.add_parser("bench", help="llama-bench-style throughput of an artifact on this machine")
    b.add_argument("artifact")
    b.add_argument("-p", "--prompt-lens", type=ints, default=[128, 512, 2048], help="prefill sizes (default 128,512,2048)")
    b.add_argument("-n", "--gen", type=int, default=128, help="decode steps per tg row (default 128)")
    b.add_argument("-d", "--depths", type=ints, default=[0, 512], help="KV depths for tg rows (default 0,512)")
    b.add_argument("-b", "--batches", type=ints, default=[1, 4, 16, 64], help="decode batch sizes (default 1,4,16,64)")
    b.add_argument("-r", "--repetitions", type=int, default=3)
    b.add_argument("--no-ttft", action="store_true", help="skip the engine time-to-first-token row")
    b.add_argument("--json", action="store_true", help="print the results as JSON")

    bs = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server (ferrum, llama.cpp, vLLM)")
    bs.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    bs.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels (default 1,4,16,32)")
    bs.add_argument("--input-len", type=int, default=256, help="prompt tokens, about (default 256)")
    bs.add_argument("--output-len", type=int, default=128, help="tokens asked per request (default 128)")
    bs.add_argument("--num-prompts", type=int, help="requests per level (default max(8, 4 x concurrency))")
    bs.add_argument("--model", help="model id (default: the server's first)")
    bs.add_argument("--api-key")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--records", help="write one JSON line per request to this file")
    bs.add_argument("--temperature", type=float, help="sent with every request (default 0: greedy)")
    bs.add_argument("--top-p", type=float, help="sent with every request (default: not sent)")
    bs.add_argument("--top-k", type=int, help="sent with every request (default: not sent; vLLM's and "
                    "llama.cpp's extension)")
    bs.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _inspect(args: argparse.Namespace) -> int:
    from .artifact import IR_JSON, IR_TEXT, read_manifest

    m = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(m.data, indent=2))
        return 0
    d = m.data
    cfg = m.model["config"]
    n_params = sum(1 for a in m.entry["args"] if a["role"] == "param")
    size = sum(p.stat().st_size for p in m.path.rglob("*") if p.is_file())
    lines = [
        f"artifact   {m.path}  ({size / 2**20:.1f} MiB, ABI {d['abi_version']}, ferrum {d['versions']['ferrum']}, "
        f"tvm {d['versions']['tvm']}, tvm-ffi {d['versions']['tvm_ffi']})",
        f"source     {d['source']['name']} ({d['source']['kind']})",
        f"target     {m.target['name']}  {json.dumps(m.target['tvm_target'])}"
        + (f"  needs CPU features: {' '.join(m.target['cpu_features'])}" if m.target.get("cpu_features") else "")
        + (f"  cubin: {' '.join(m.target['cuda_code']['cubin'])}  ptx: {' '.join(m.target['cuda_code']['ptx']) or '-'}"
           if m.target.get("cuda_code") else "")
        + (_kernels_summary(m.target["cuda_kernels"]) if m.target.get("cuda_kernels") else ""),
        f"model      {m.model['family']}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, heads "
        f"{cfg['num_heads']}/{cfg['num_kv_heads']} x {cfg['head_dim']}, ffn {cfg['intermediate_size']}, vocab "
        f"{cfg['vocab_size']}, max len {m.model['max_model_len']}",
        f"dtype      {d['dtype']}   quantization: {_quant_summary(d['quantization'])}"
        + ("   weights: none yet (compiled with --no-weights; `ferrum pack-weights`)" if d["weights"].get("pending") else ""),
        f"kv cache   block {m.kv_cache['block_size']}, {m.kv_cache['layout']}, {m.kv_cache['dtype']}",
        f"entry      forward({len(m.entry['args']) - n_params} inputs, {n_params} weights) -> logits "
        f"{m.entry['returns']['shape']} {m.entry['returns']['dtype']}"
        + (f"; decode(same) for batches of <= {d['entry_points']['decode']['max_tokens']} tokens (GEMV kernels)"
           if "decode" in d["entry_points"] else "")
        + ("; decode_one(same) for steps of one token" if "decode_one" in d["entry_points"] else "")
        + (f"; decode_graph(same, CUDA graphs; FERRUM_CUDA_GRAPH=0: off) for block tables of <= "
           f"{d['entry_points']['decode_graph']['max_blocks']} blocks" if "decode_graph" in d["entry_points"] else "")
        + ("; decode_wide(same, split-KV attention) for larger steps of one token per sequence"
           if "decode_wide" in d["entry_points"] else "")
        + (f"; decode_wide_graph(same, CUDA graphs) for up to "
           f"{d['entry_points']['decode_wide_graph']['max_tokens']} of them"
           if "decode_wide_graph" in d["entry_points"] else ""),
        f"ir         " + ", ".join(f"{k} x{v}" for k, v in d["ir"]["ops"].items()) + f"  (passes: {', '.join(d['ir']['passes'])})",
        f"built      {d['build']['time']} on {d['build']['host']} in {d['build']['seconds']} s",
    ]
    pdl = d["compile_options"].get("pdl")  # its mode (True: built before the modes, FERRUM_PDL=1's "early")
    pdl_name = f"programmatic dependent launches (FERRUM_PDL, {'early' if pdl is True else pdl})"
    dp4a = d["compile_options"].get("gemv_dp4a")  # its mode (True: built before the modes, "lanes")
    dp4a_name = f"INT4 decode GEMVs on integer dot products (FERRUM_GEMV_DP4A, {'lanes' if dp4a is True else dp4a})"
    mma = d["compile_options"].get("mma_linear")
    mma_name = f"the linears of many-token decode steps on tensor-core mma's (FERRUM_MMA_LINEAR, {mma})"
    experiments = [name for name, on in (("norms deferred into the decode GEMVs (FERRUM_GEMV_NORMS)",
                                          d["compile_options"].get("gemv_norms")), (pdl_name, pdl),
                                         (dp4a_name, dp4a), (mma_name, mma),
                                         ("forward's attention in one pass on mma.sync (FERRUM_FLASH_ATTENTION)",
                                          d["compile_options"].get("flash_attention")),
                                         ("forward's linears on the mma.sync GEMM (FERRUM_MMA_GEMM)",
                                          d["compile_options"].get("mma_gemm")),
                                         ("decode's split attention merging itself (FERRUM_MERGED_ATTENTION)",
                                          d["compile_options"].get("merged_attention"))) if on]
    if experiments:
        lines.append(f"experiments {'; '.join(experiments)}")
    print("\n".join(lines))
    if args.ir:
        print((m.path / IR_TEXT).read_text())
    elif (m.path / IR_JSON).is_file():
        text = (m.path / IR_TEXT).read_text().splitlines()
        print("\n".join(text[:40]) + (f"\n  ... ({len(text) - 40} more lines; --ir prints all)" if len(text) > 40 else ""))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import run_cli

    args.artifact = str(_artifact_path(args.artifact))
    return run_cli(args)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .artifact import check_compatible, read_manifest
    from .engine import EngineConfig
    from .server import ServeConfig, Server

    args.artifact = str(_artifact_path(args.artifact))
    manifest = read_manifest(args.artifact)
    speculative = speculative_config(args.speculative_tokens, manifest.target["device"])
    check_compatible(manifest)  # refuse a bad artifact before the port opens
    check_listen(args.host, args.port)  # and a port it cannot have, before the model loads
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limits = (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens", args.max_num_batched_tokens))
    for flag, value in limits:
        if value is not None and value <= 0:
            raise FerrumError(f"{flag} {value}: pass a number above 0")
    if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
        raise FerrumError(f"--kv-cache-memory {args.kv_cache_memory}: pass a budget in MiB above 0, or leave it "
                          "out to size the cache to the device")
    kv_bytes = None if args.kv_cache_memory is None else args.kv_cache_memory << 20
    engine = EngineConfig(kv_cache_bytes=kv_bytes, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, verify_hashes=False,
                          speculative=speculative)
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
                         max_waiting=args.max_waiting, cors=args.cors, disable_thinking=args.disable_thinking,
                         engine=engine)
    print(f"ferrum: serving {args.artifact} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    Server(args.artifact, config).run()
    return 0


SPECULATIVE_HELP = ("speculative decoding: draft up to N tokens a step from earlier text of the prompt and "
                    "answer that ends the same way (prompt lookup), verified in the same step: the same output, "
                    "faster where answers repeat their context (code edits, quoting, extraction, JSON), drafted "
                    "only while they pay at the batch's size; 0: off (default: 3 on CPUs, 0 on GPUs, where it is "
                    "not measured yet)")
DEFAULT_SPECULATIVE_TOKENS = {"cpu": 3}  # by device; others 0
MAX_SPECULATIVE_TOKENS = 16
THINKING_HELP = ("answer without a reasoning block: enable_thinking=False for chat templates that read it "
                 "(Qwen3); default: the template's own default")


def speculative_config(n: int | None, device: str) -> "SpeculativeConfig | None":
    """``--speculative-tokens N`` as the engine's SpeculativeConfig (None: off) for an artifact built for
    ``device``; without the flag, the device's default."""
    from .speculative import SpeculativeConfig

    if n is None:
        n = DEFAULT_SPECULATIVE_TOKENS.get(device, 0)
    if not 0 <= n <= MAX_SPECULATIVE_TOKENS:
        raise FerrumError(f"--speculative-tokens {n}: pass 1-{MAX_SPECULATIVE_TOKENS} drafts a step (3 suits most "
                          "text), or 0 to turn speculative decoding off")
    return SpeculativeConfig(n) if n else None


def check_listen(host: str, port: int) -> None:
    """Raise FerrumError naming the fix when the server could not listen on ``host:port`` (taken, not
    allowed, not an address of this machine). Sanic would fail later with a bare OSError."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise FerrumError(f"--port {port} is not a TCP port; pass one in 1-65535 (default 8000)")
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        raise FerrumError(f"cannot listen on {host}:{port} ({e}); pass --host 127.0.0.1 (this machine) or 0.0.0.0 "
                          "(every interface)") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            sock.bind(addr)
        except OSError as e:
            fixes = {errno.EADDRINUSE: f"port {port} is in use on {host} (another server?); stop it or pick "
                                       "another --port",
                     errno.EACCES: f"no permission to listen on port {port}; pick a --port above 1023",
                     errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; pass --host 127.0.0.1 or "
                                          "0.0.0.0"}
            other = f"cannot listen on {host}:{port} ({e.strerror}); pick another --host or --port"
            raise FerrumError(fixes.get(e.errno or 0, other)) from None


def _artifact_path(name: str) -> Path:
    """An artifact directory as given, or an alias (``smollm2``) compiled for this machine once, by
    ``ferrum compile`` in a child process (this process stays on TVM's runtime library), and cached."""
    if (Path(name) / "ferrum.yaml").is_file():
        return Path(name)
    import subprocess

    from .aliases import cached_artifact_dir, resolve_alias

    if resolve_alias(name) is None:
        raise FerrumError(f"{name} is neither an artifact directory nor a model alias; build one with "
                          f"`ferrum compile MODEL -o DIR`, or use an alias: {', '.join(alias_names())}")
    path = cached_artifact_dir(name, "cpu")
    if not (path / "ferrum.yaml").is_file():
        print(f"compiling {name} for this machine once (cached in {path})", file=sys.stderr)
        res = subprocess.run([sys.executable, "-m", "ferrum_runtime.cli", "compile", name, "--target", "cpu", "-o",
                              str(path)])
        if res.returncode:
            raise FerrumError(f"compiling {name} failed (see above)")
    return path


def _kernels_summary(k: dict) -> str:
    """``  kernels: 31, <= 164 registers, no local memory`` (or the kernels that use it)."""
    local = k["local_memory"]
    return (f"  kernels: {k['kernels']}, <= {k['max_registers']} registers, "
            + (f"local memory in {len(local)}: " + ", ".join(f"{n} {b} B" for n, b in local.items()) if local
               else "no local memory"))


def _quant_summary(q: dict) -> str:
    """``gguf: 120 weights packed (4-bit g32 asym x119, 8-bit g32 sym x1), 0 dense linears``."""
    weights = q.get("weights") or {}
    if not weights:
        return q["method"] + (f" ({q['note']})" if q.get("note") else "")
    kinds: dict[str, int] = {}
    for spec in weights.values():
        key = (f"{spec['bits']}-bit g{spec['group_size']} {'sym' if spec['sym'] else 'asym'}"
               + (" value-table" if spec.get("table") else "")
               + (" act-order" if spec.get("act_order") else "") + (f" {spec['layout']}" if spec.get("layout") else "")
               + (f" int{spec['act_bits']}-activations" if spec.get("act_bits") else ""))
        kinds[key] = kinds.get(key, 0) + 1
    dense = len(q.get("dense_weights") or [])
    return (f"{q['method']}: {len(weights)} weights packed ("
            + ", ".join(f"{k} x{v}" for k, v in kinds.items()) + f"), {dense} dense matrices")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "compile":  # needs TVM's compiler library, whatever the environment says
        os.environ.pop("TVM_USE_RUNTIME_LIB", None)
    else:  # serve and run with TVM's runtime library only
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    try:
        if args.command == "compile":
            from ferrum_compiler.cli import run_compile

            return run_compile(args)
        if args.command == "pack-weights":
            from ferrum_compiler.pack import pack_weights

            pack_weights(args.artifact, args.model, progress=lambda m: print(m, file=sys.stderr, flush=True))
            return 0
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            from .bench import main as bench_main

            args.artifact = str(_artifact_path(args.artifact))
            return bench_main(args)
        if args.command == "bench-serve":
            from .bench_serve import main as bench_serve_main

            return bench_serve_main(args)
        return _run(args)
    except KeyboardInterrupt:
        print("ferrum: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ferrum inspect ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - the top of the CLI: one line for the user, never a traceback
        if DEBUG:
            raise
        if isinstance(e, FerrumError):
            print(f"ferrum: error: {e}", file=sys.stderr)
            return 2
        print(f"ferrum: internal error: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with FERRUM_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
