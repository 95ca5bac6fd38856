"""The compiled model behind the runtime ↔ model contract of DESIGN §5.

``CompiledModel.load(artifact)`` checks the artifact, loads ``model.so`` into a Relax VM, uploads the
weights and allocates the paged KV cache (one tensor per layer, ``[num_blocks, 2, kv_heads, block_size,
head_dim]``). ``forward(batch)`` runs one flattened ragged step (prefill chunks and decode tokens mixed)
and returns float32 logits for the rows ``batch.logits_index`` names (one per sequence when
generating, every prompt row when scoring).

Only TVM's runtime library is needed: the ``ferrum`` CLI sets ``TVM_USE_RUNTIME_LIB=1`` before TVM is
first imported for every command but ``compile``.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np

from .errors import FerrumError
from .artifact import LIBRARY, ArtifactError, Manifest, check_compatible, read_manifest
from . import env
from .env import configure_threads, tvm_without_torch
from .safetensors_io import SafetensorsFile, np_dtype

log = logging.getLogger("ferrum")


@dataclass(frozen=True)
class RaggedBatch:
    """One step's flattened batch; all arrays int32."""

    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    query_start: np.ndarray  # [B+1]
    block_tables: np.ndarray  # [B, M]
    slot_mapping: np.ndarray  # [T]; -1 = do not store
    logits_index: np.ndarray  # [L]: rows of T to return logits for (B for generation, more for prompt scoring)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return {"token_ids": self.token_ids, "positions": self.positions, "query_start": self.query_start,
                "block_tables": self.block_tables, "slot_mapping": self.slot_mapping, "logits_index": self.logits_index}


@dataclass(frozen=True)
class StepOutput:
    """A launched step's picked ids and logits (either may be None), still on the device."""

    ids: Any
    logits: Any

    def result(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The ids and logits on the host, once the step has run (a GPU step: this waits for it)."""
        return (None if self.ids is None else self.ids.numpy(), None if self.logits is None else self.logits.numpy())


DEFAULT_KV_CACHE_BYTES = 512 << 20  # where the device does not report its free memory (CPUs, Metal)
GPU_MEMORY_UTILIZATION = 0.9  # of a GPU's memory, for weights + KV cache + activations (vLLM's default)
ACTIVATION_RESERVE = 1 << 30  # left out of that for the steps' activations and workspace


def auto_kv_cache_bytes(total: int | None, available: int | None) -> int:
    """KV cache bytes when none is asked for: on a device that reports its memory (CUDA), what is left of
    90% of it with the weights (and whatever else holds memory) in, less 1 GiB for activations, at least
    64 MiB; elsewhere 512 MiB."""
    if not total or available is None:
        return DEFAULT_KV_CACHE_BYTES
    return max(int(GPU_MEMORY_UTILIZATION * total) - (total - available) - ACTIVATION_RESERVE, 64 << 20)


def _kv_block_elements(kv: dict) -> int:
    """Elements of one block of one layer's KV cache (the manifest's ``kv_cache``): keys and values."""
    return 2 * kv["kv_heads"] * kv["block_size"] * kv["head_dim"]


def kv_block_bytes(kv: dict) -> int:
    """Bytes of one block of the KV cache over all layers."""
    return _kv_block_elements(kv) * np_dtype(kv["dtype"]).itemsize * kv["num_layers"]


def kv_blocks(kv_cache_bytes: int, kv: dict) -> int:
    """Blocks that ``kv_cache_bytes`` hold, at least 1, and at most what keeps one layer's cache under 2^31
    elements (index arithmetic may be int32): over a million tokens for Qwen3's heads."""
    return max(1, min(kv_cache_bytes // kv_block_bytes(kv), (2**31 - 1) // _kv_block_elements(kv)))


class BatchError(FerrumError):
    """A batch the compiled model must not see (it would read out of bounds)."""


class CompiledModel:
    def __init__(self, manifest: Manifest, device: str, num_blocks: int | None, kv_cache_bytes: int | None = None):
        configure_threads()
        tvm_without_torch()
        import tvm
        from tvm.runtime import vm as rvm

        self.manifest = manifest
        cfg = manifest.model["config"]
        self.vocab_size = int(cfg["vocab_size"])
        self.max_model_len = int(manifest.model["max_model_len"])
        kv = manifest.kv_cache
        self.block_size = int(kv["block_size"])
        self.num_layers = int(kv["num_layers"])
        if device == "cuda":
            load_cuda_runtime()
        self.device = tvm.device(device)
        if not self.device.exist:
            raise ArtifactError(f"no {device} device is visible to this process; run the artifact on a machine with one")
        lib = tvm.runtime.load_module(str(manifest.path / LIBRARY))
        self.vm = rvm.VirtualMachine(lib, self.device)
        self._fn = self.vm["forward"]
        entries = manifest.data["entry_points"]
        # GPU artifacts: a second entry point whose linears are GEMV kernels, for batches of few tokens
        self._decode_fn = self.vm["decode"] if "decode" in entries else None
        self.decode_max_tokens = decode_max_tokens(entries.get("decode"))
        # ... and again for steps of one token, its GEMVs in passes of one token (fewer registers)
        self._one_fn = self.vm["decode_one"] if "decode_one" in entries else None
        # CUDA artifacts: the decode entry point again, run as CUDA graphs (unless FERRUM_CUDA_GRAPH=0); its step
        # inputs must be the same buffers for the same shapes, so they are staged in fixed device tensors
        graph, wide_graph = entries.get("decode_graph"), entries.get("decode_wide_graph")
        self._graph_fn = self.vm["decode_graph"] if graph and device == "cuda" and env.cuda_graph() else None
        self.graph_max_tokens = int(graph["max_tokens"]) if graph else 0
        self.graph_max_blocks = int(graph["max_blocks"]) if graph else 0
        # and decode_wide as CUDA graphs, for steps of up to wide_graph_max_tokens decode tokens
        self._wide_graph_fn = self.vm["decode_wide_graph"] if wide_graph and self._graph_fn is not None else None
        self._one_graph_fn = self._one_graph()
        self.wide_graph_max_tokens = int(wide_graph["max_tokens"]) if wide_graph else 0
        # CUDA artifacts whose forward attention is on tensor cores: forward with the split-KV attention,
        # for steps of only decode tokens that are too many for the decode entry point
        self._wide_fn = self.vm["decode_wide"] if "decode_wide" in entries else None
        self._staging: dict[str, Any] = {}  # the CUDA-graph entries' fixed input tensors
        self._replayed: set[tuple] = set()  # (entry, input shapes) whose graph has run: captured
        self._inputs: dict[str, Any] = {}  # the other entries' input tensors, grown as steps need
        # views of those tensors at the shapes steps had, and the copy behind Tensor.copyfrom without its
        # Python checks: a step's six inputs took ~100 us of a 2-core box's time through copyfrom and
        # fresh views, ~18 us this way
        self._views: dict[tuple[int, str, tuple[int, ...]], tuple[Any, Any]] = {}
        self._copy_bytes = tvm.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._sent: dict[tuple[int, str], tuple[Any, bytes]] = {}  # (buffers, input) -> (tensor, bytes copied in)
        # tokens picked where the logits are: greedy (every artifact from this version on) and sampled (GPU)
        self._argmax_fn = self.vm["argmax"] if "argmax" in entries else None
        self._sample_fn = self.vm["sample"] if "sample" in entries else None
        args = manifest.entry["args"]
        param_names = [a["name"] for a in args if a["role"] == "param"]
        self.params = self._load_params(param_names)
        if num_blocks is None:  # as many blocks as kv_cache_bytes hold; None: sized to the device, weights in
            if kv_cache_bytes is None:
                kv_cache_bytes = auto_kv_cache_bytes(self.device.total_global_memory,
                                                     self.device.available_global_memory)
            num_blocks = kv_blocks(kv_cache_bytes, kv)
        self.num_blocks = num_blocks
        cache_shape = (num_blocks, 2, int(kv["kv_heads"]), self.block_size, int(kv["head_dim"]))
        self.kv_caches = [tvm.runtime.empty(cache_shape, kv["dtype"], self.device) for _ in range(self.num_layers)]
        # the call's argument list, resident tensors in place; batch inputs fill the open slots per step
        resident = {**{f"kv_cache.{i}": c for i, c in enumerate(self.kv_caches)}, **dict(zip(param_names, self.params))}
        self._args = [resident.get(a["name"]) for a in args]
        self._slots = [(i, a["name"]) for i, a in enumerate(args) if a["name"] not in resident]

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block over all layers."""
        return kv_block_bytes(self.manifest.kv_cache)

    @classmethod
    def load(cls, artifact: str | Path, device: str | None = None, num_blocks: int | None = None,
             kv_cache_bytes: int | None = 256 << 20, verify_hashes: bool = True) -> "CompiledModel":
        """Load an artifact on ``device`` (default: the one it was compiled for); the KV cache gets
        ``num_blocks`` blocks, or as many as fit ``kv_cache_bytes`` (None: ``auto_kv_cache_bytes`` once the
        weights are on the device)."""
        manifest = read_manifest(artifact)
        check_compatible(manifest, verify_hashes=verify_hashes)
        device = device or manifest.target["device"]
        if manifest.target["device"] != device:
            raise ArtifactError(f"artifact {artifact} targets {manifest.target['name']} ({manifest.target['device']}), "
                                f"not {device}; compile it with `--target` for this device")
        return cls(manifest, device, num_blocks, kv_cache_bytes)

    def _load_params(self, names: list[str]) -> list:
        import tvm

        index = self.manifest.data["weights"]["index"]
        files: dict[str, SafetensorsFile] = {}
        out = []
        for name in names:
            fname = index[name]
            if fname not in files:
                files[fname] = SafetensorsFile(self.manifest.path / "weights" / fname)
            out.append(tvm.runtime.tensor(np.ascontiguousarray(files[fname].get(name)), self.device))
        return out

    def check_batch(self, batch: RaggedBatch) -> None:
        """Bounds the kernels rely on; a violation raises instead of reading out of bounds."""
        t = len(batch.token_ids)
        b = len(batch.query_start) - 1
        if t == 0 or b <= 0 or len(batch.logits_index) == 0:
            raise BatchError("empty batch")
        if batch.positions.shape != (t,) or batch.slot_mapping.shape != (t,) or batch.query_start.shape != (b + 1,):
            raise BatchError("positions/slot_mapping must have T entries and query_start B+1")
        if batch.block_tables.ndim != 2 or batch.block_tables.shape[0] != b:
            raise BatchError(f"block_tables must be [B, M]; got {batch.block_tables.shape} for B={b}")
        if batch.token_ids.min() < 0 or batch.token_ids.max() >= self.vocab_size:
            raise BatchError(f"token ids must lie in [0, {self.vocab_size})")
        if batch.query_start[0] != 0 or batch.query_start[-1] != t or np.any(np.diff(batch.query_start) < 0):
            raise BatchError("query_start must rise from 0 to T")
        if batch.logits_index.min() < 0 or batch.logits_index.max() >= t:
            raise BatchError("logits_index must point at rows of the batch")
        if batch.positions.min() < 0 or batch.positions.max() >= batch.block_tables.shape[1] * self.block_size:
            raise BatchError("a position lies beyond its sequence's block table")
        if batch.block_tables.min() < 0 or batch.block_tables.max() >= self.num_blocks:
            raise BatchError(f"block ids must lie in [0, {self.num_blocks})")
        if batch.slot_mapping.max() >= self.num_blocks * self.block_size:
            raise BatchError("slot_mapping points past the KV cache")

    def forward(self, batch: RaggedBatch, check: bool = True) -> np.ndarray:
        """Run one step; returns logits ``[L, vocab]`` float32 for the rows ``batch.logits_index`` names."""
        logits = self.launch(batch, pick=False, check=check).result()[1]
        assert logits is not None
        return logits

    @property
    def has_device_argmax(self) -> bool:
        return self._argmax_fn is not None

    @property
    def has_device_sampler(self) -> bool:
        return self._sample_fn is not None

    def forward_picked(self, batch: RaggedBatch, sampling: tuple[np.ndarray, np.ndarray] | None,
                       with_logits: bool, check: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one step and pick a token per logits row on the device: the argmax (int32, ties to the
        lowest id) when ``sampling`` is None, else the artifact's sampler with ``(params [L, 4] float32:
        temperature, top_k, top_p, min_p; uniform [L] float32)``. Returns the ids and, when
        ``with_logits``, the logits too (else None): only ``L`` ids are copied back otherwise."""
        ids, logits = self.launch(batch, True, sampling, with_logits, check).result()
        assert ids is not None
        return ids, logits

    def launch(self, batch: RaggedBatch, pick: bool, sampling: tuple[np.ndarray, np.ndarray] | None = None,
               with_logits: bool = True, check: bool = True) -> "StepOutput":
        """Start one step (``forward_picked`` when ``pick``, else ``forward``) and return at once with its
        results on the device: on a GPU the kernels are queued, not finished, and ``result()`` waits for
        them; on a CPU they have run. Call ``result()`` before the next launch: a CUDA-graph step's
        logits live in the graph's own buffer, which the next replay overwrites."""
        import tvm

        fn = self._argmax_fn if sampling is None else self._sample_fn
        if not pick:
            return StepOutput(None, self._run(batch, check))
        if fn is None:
            raise ArtifactError("this artifact cannot pick tokens on its device; recompile it with this ferrum")
        # uploaded first: a copy to the device waits for the kernels queued before it
        extra = [] if sampling is None else [tvm.runtime.tensor(a, self.device) for a in sampling]
        logits = self._run(batch, check)
        return StepOutput(fn(logits, *extra), logits if with_logits else None)

    def _run(self, batch: RaggedBatch, check: bool):
        """The step's logits, left on the device."""
        if check:
            self.check_batch(batch)
        ntok = len(batch.token_ids)
        small = ntok <= self.decode_max_tokens  # decode_max_tokens is 0 without a decode entry point
        # one token per sequence, too many for decode: decode_wide (split-KV attention)
        wide = not small and self._wide_fn is not None and ntok == len(batch.query_start) - 1
        one = small and ntok == 1  # decode_one(_graph), where the artifact has it
        graph = ""
        if self._graph_fn is not None and small and self._fits_graph(batch, self.graph_max_tokens):
            graph = "decode_one_graph" if one and self._one_graph_fn is not None else "decode_graph"
        elif self._wide_graph_fn is not None and wide and self._fits_graph(batch, self.wide_graph_max_tokens):
            graph = "decode_wide_graph"
        if graph:
            logits = self._graph_call(graph, batch)
            if logits is not None:
                return logits
        args = self._copy_in(batch.arrays, self._inputs, grow=True)
        if one and self._one_fn is not None:
            return self._one_fn(*args)
        if small and self._decode_fn is not None:
            return self._decode_fn(*args)
        if wide and self._wide_fn is not None:
            return self._wide_fn(*args)
        return self._fn(*args)

    @property
    def cuda_graph(self) -> bool:
        """Whether decode steps run as CUDA graphs (``decode_graph``, and ``decode_wide_graph`` where the
        artifact has it; on unless FERRUM_CUDA_GRAPH=0 at load)."""
        return self._graph_fn is not None

    @cuda_graph.setter
    def cuda_graph(self, on: bool) -> None:
        entries = self.manifest.data["entry_points"]
        if on and "decode_graph" not in entries:
            raise ArtifactError("this artifact has no CUDA-graph entry point; compile it for a cuda-sm* target")
        self._graph_fn = self.vm["decode_graph"] if on else None
        self._wide_graph_fn = self.vm["decode_wide_graph"] if on and "decode_wide_graph" in entries else None
        self._one_graph_fn = self._one_graph()

    @property
    def decode_one(self) -> bool:
        """Whether steps of one token take ``decode_one`` (``decode_one_graph`` with CUDA graphs): GEMVs in
        passes of one token. Off: they take ``decode`` like the other small steps (for measuring both)."""
        return self._one_fn is not None

    @decode_one.setter
    def decode_one(self, on: bool) -> None:
        entries = self.manifest.data["entry_points"]
        if on and "decode_one" not in entries:
            raise ArtifactError("this artifact has no decode_one entry point; recompile it for a GPU target with "
                                "this ferrum")
        self._one_fn = self.vm["decode_one"] if on else None
        self._one_graph_fn = self._one_graph()

    def _one_graph(self):
        """``decode_one_graph`` when both ``decode_one`` and CUDA graphs are on and the artifact has it."""
        on = self._one_fn is not None and self._graph_fn is not None
        return self.vm["decode_one_graph"] if on and "decode_one_graph" in self.manifest.data["entry_points"] else None

    @property
    def decode_wide(self) -> bool:
        """Whether steps of one token per sequence too large for ``decode`` take ``decode_wide`` (forward
        with the split-KV attention; CUDA artifacts with the tensor-core attention) instead of forward."""
        return self._wide_fn is not None

    @decode_wide.setter
    def decode_wide(self, on: bool) -> None:
        if on and "decode_wide" not in self.manifest.data["entry_points"]:
            raise ArtifactError("this artifact has no decode_wide entry point (CUDA artifacts with tensor-core "
                                "attention have one)")
        self._wide_fn = self.vm["decode_wide"] if on else None

    def _fits_graph(self, batch: RaggedBatch, most: int) -> bool:
        """Within the shapes a CUDA-graph entry's memory was planned for (``most`` tokens)."""
        return (len(batch.token_ids) <= most and len(batch.query_start) - 1 <= most
                and len(batch.logits_index) <= most and batch.block_tables.shape[1] <= self.graph_max_blocks)

    def _copy_in(self, arrays: dict, buffers: dict, grow: bool) -> list:
        """The call's arguments with the step's inputs copied into the device tensors ``buffers`` keeps
        from step to step, passed as views at offset 0 of the step's shapes (TVM kernels refuse other
        offsets). With ``grow`` a tensor too small (or missing) is replaced by one twice as large; the
        CUDA-graph entries' tensors are allocated at their bounds and never replaced. An input whose bytes
        the tensor got last time is not copied again (a decode step's query starts, logits rows and most
        block tables: on a GPU each copy is a synchronous transfer of its own)."""
        import tvm

        args = list(self._args)
        for i, name in self._slots:
            host = np.ascontiguousarray(arrays[name], dtype=np.int32)
            buf = buffers.get(name)
            if grow and (buf is None or buf.shape[0] < host.size):
                size = max(host.size, 2 * (buf.shape[0] if buf is not None else 0), 64)
                buf = buffers[name] = tvm.runtime.empty((size,), "int32", self.device)
            view = self._view(buffers, name, buf, host.shape)
            data, sent = host.tobytes(), self._sent.get((id(buffers), name))
            if sent is None or sent[0] is not buf or sent[1] != data:
                self._copy_bytes(view, ctypes.c_void_p(host.ctypes.data), host.nbytes)
                self._sent[(id(buffers), name)] = (buf, data)
            args[i] = view
        return args

    def _view(self, buffers: dict, name: str, buf, shape: tuple[int, ...]):
        """``buf`` (``buffers[name]``) viewed at ``shape``, made once per shape while ``buf`` lives."""
        key = (id(buffers), name, shape)
        hit = self._views.get(key)
        if hit is not None and hit[0] is buf:
            return hit[1]
        if len(self._views) >= 1024:  # shapes vary with the batch; keep the recent ones only
            self._views.clear()
        view = buf._create_view(shape)
        self._views[key] = (buf, view)
        return view

    def _graph_call(self, entry: str, batch: RaggedBatch):
        """CUDA-graph entry point ``entry`` on the step's staged inputs. Its first call for a shape captures the
        graph; if that fails (out of memory while capturing, a driver without graphs), decode steps run
        without graphs from then on, with one warning, and None says: run this step directly. A step's
        writes (its KV cache rows, its logits) are the same when run again. A graph that has run before
        fails like any other call."""
        fn = {"decode_graph": self._graph_fn, "decode_one_graph": self._one_graph_fn,
              "decode_wide_graph": self._wide_graph_fn}[entry]
        args = self._staged_args(batch)
        key = (entry, *(tuple(a.shape) for a in args))
        if key in self._replayed:
            return fn(*args)
        try:
            logits = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the step runs again without graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("ferrum: capturing a CUDA graph failed (%s); decode steps run without CUDA graphs "
                        "from here on (FERRUM_CUDA_GRAPH=0 skips them)", first)
            self.cuda_graph = False
            return None
        self._replayed.add(key)
        return logits

    def _staged_args(self, batch: RaggedBatch) -> list:
        """The step's inputs copied into fixed device tensors (allocated once, at the largest shapes, so a
        captured graph finds its inputs where it recorded them), the block table widened with zeros to a
        power of two of columns (blocks past a sequence's length are never read) so that few shapes, hence
        few graphs, occur."""
        import tvm

        m = batch.block_tables.shape[1]
        width = min(1 << max(m - 1, 0).bit_length(), self.graph_max_blocks)
        arrays = dict(batch.arrays)
        if width > m:
            tables = np.zeros((batch.block_tables.shape[0], width), np.int32)
            tables[:, :m] = batch.block_tables
            arrays["block_tables"] = tables
        if not self._staging:  # one set for both graph entries, at the larger bound
            most = max(self.graph_max_tokens, self.wide_graph_max_tokens)
            sizes = {"token_ids": most, "positions": most, "slot_mapping": most, "logits_index": most,
                     "query_start": most + 1, "block_tables": most * self.graph_max_blocks}
            self._staging = {n: tvm.runtime.empty((k,), "int32", self.device) for n, k in sizes.items()}
        return self._copy_in(arrays, self._staging, grow=False)


def decode_max_tokens(entry: dict | None) -> int:
    """Largest batch (in tokens) the ``decode`` entry point takes: the artifact's ``max_tokens``, or
    ``FERRUM_DECODE_MAX_TOKENS`` when set (0 turns the entry off, for measuring both); 0 without one."""
    if not entry:
        return 0
    try:
        return env.decode_max_tokens(int(entry.get("max_tokens", 0)))
    except ValueError as e:
        raise ArtifactError(str(e)) from None


def load_cuda_runtime() -> None:
    """TVM's CUDA runtime is a separate library; load it (needs the driver and libcudart.so.13)."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_GLOBAL",
                                                           extra_lib_paths=[runtime_dir])
    except (OSError, RuntimeError) as e:
        raise ArtifactError(f"cannot load TVM's CUDA runtime ({str(e).splitlines()[0]}); install the NVIDIA driver "
                            "and the CUDA 13 runtime (libcudart.so.13 on LD_LIBRARY_PATH)") from None
