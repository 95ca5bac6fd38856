"""The artifact contract (DESIGN §4): manifest schema, ABI version, and the checks the runtime makes
before it loads anything. Shared by the compiler's writer and the runtime's loader."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .env import cache_dir, tvm_without_torch
from .errors import FerrumError

ABI_VERSION = 1
MANIFEST = "ferrum.yaml"
LIBRARY = "model.so"
IR_JSON = "ir.json"
IR_TEXT = "ir.txt"


class ArtifactError(FerrumError):
    """The artifact cannot be used here; the message is one line that names the fix."""


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class Manifest:
    path: Path  # the artifact directory
    data: dict

    @property
    def target(self) -> dict:
        return self.data["target"]

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def kv_cache(self) -> dict:
        return self.data["kv_cache"]

    @property
    def entry(self) -> dict:
        return self.data["entry_points"]["forward"]


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a ferrum artifact (no {MANIFEST}); build one with `ferrum compile MODEL -o {path}`")
    try:  # libyaml's parser where PyYAML has it: 24 ms instead of 210 for SmolLM2's 117 KB manifest
        data = yaml.load(mf.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ArtifactError(f"{mf} is not valid YAML ({e.__class__.__name__}); recompile the artifact") from None
    if not isinstance(data, dict) or "abi_version" not in data:
        raise ArtifactError(f"{mf} has no abi_version; recompile the artifact with `ferrum compile`")
    return Manifest(path, data)


def check_compatible(m: Manifest, verify_hashes: bool = True) -> None:
    """Refuse, in one line naming the fix, an artifact this runtime and host cannot run."""
    d = m.data
    fix = f"recompile it with this ferrum: `ferrum compile {d.get('source', {}).get('name', 'MODEL')} --target {m.target.get('name', 'cpu')} -o {m.path}`"
    if d["abi_version"] != ABI_VERSION:
        raise ArtifactError(f"artifact {m.path} has ABI version {d['abi_version']}, this runtime reads {ABI_VERSION}; {fix}")
    tvm_now = package_version("apache-tvm")
    if tvm_now == "unknown":  # a runtime-only TVM copied onto PYTHONPATH (pack-tvm-runtime.sh) has no metadata
        tvm_without_torch()
        import tvm

        tvm_now = tvm.__version__
    if d["versions"]["tvm"] != tvm_now:
        raise ArtifactError(f"artifact {m.path} was built with apache-tvm {d['versions']['tvm']}, this runtime has {tvm_now}; "
                            f"install apache-tvm=={d['versions']['tvm']} or {fix}")
    if d.get("weights", {}).get("pending"):
        raise ArtifactError(f"artifact {m.path} was compiled with --no-weights and has none yet; add them with "
                            f"`ferrum pack-weights {m.path} {d.get('source', {}).get('name', 'MODEL')}`")
    need = set(m.target.get("cpu_features") or ())
    if need:
        have = host_cpu_flags()
        if have:
            missing = sorted(need - have)
            if missing:
                raise ArtifactError(f"artifact {m.path} was built for a CPU with {', '.join(missing)}, which this CPU lacks; "
                                    f"compile for this machine with `--target cpu` or a portable `--target cpu-x86-64-v3`")
    if verify_hashes:
        verified = VerifiedFiles()
        for rel, digest in d["files"].items():
            f = m.path / rel
            if not f.is_file():
                raise ArtifactError(f"artifact {m.path} is missing {rel}; copy the whole directory or {fix}")
            before = verified.key(f, digest)
            if verified.holds(before):
                continue
            if sha256_file(f) != digest:
                raise ArtifactError(f"artifact file {f} does not match its sha256 in {MANIFEST} (corrupt or edited); {fix}")
            verified.add(f, before)
        verified.save()


class VerifiedFiles:
    """Files whose sha256 matched, each with what ``stat`` said then (size, inode, modification and change
    times), in the cache directory (``verified-files.json``). A file unchanged since is not hashed again:
    hashing an 8 GB artifact's weights at ~0.7 GB/s cost every ``ferrum serve`` and ``ferrum run`` ~11 s.
    Any write changes the change time, which no user-space call can set back; a file changed within 2 s of
    its hashing is not recorded (a coarse file clock could give a later write the same times), nor one
    that changed while it was hashed."""

    PATH = "verified-files.json"
    RACY_S = 2.0
    KEEP = 4096  # entries, the newest

    def __init__(self) -> None:
        try:
            self.file: Path | None = cache_dir() / self.PATH
            entries = json.loads(self.file.read_text())
        except RuntimeError:  # no home directory to put a cache in: every file is hashed, nothing recorded
            self.file, entries = None, {}
        except (OSError, ValueError):
            entries = {}
        self.entries: dict[str, list] = entries if isinstance(entries, dict) else {}
        self.changed = False

    @staticmethod
    def key(f: Path, digest: str) -> tuple[str, list]:
        """``(resolved path, [digest, size, inode, device, mtime ns, ctime ns])``."""
        st = f.stat()
        return str(f.resolve()), [digest, st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]

    def holds(self, key: tuple[str, list]) -> bool:
        return self.entries.get(key[0]) == key[1]

    def add(self, f: Path, before: tuple[str, list]) -> None:
        """Record ``f``, whose hash matched, if its stat is still ``before`` (taken before the hashing) and
        older than ``RACY_S``."""
        path, stat = before
        if self.key(f, stat[0]) == before and time.time_ns() - max(stat[4], stat[5]) > self.RACY_S * 1e9:
            self.entries.pop(path, None)  # re-inserted last: the newest
            self.entries[path] = stat
            self.changed = True

    def save(self) -> None:
        """Write the entries back (atomically; nothing lost but this run's entries if the directory is
        read-only or another process writes at the same moment)."""
        if not self.changed or self.file is None:
            return
        keep = dict(list(self.entries.items())[-self.KEEP:])
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.PATH}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(keep))
            os.replace(tmp, self.file)
        except OSError:
            pass

