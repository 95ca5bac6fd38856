"""What ptxas made of a CUDA artifact's kernels, read from their SASS here (cuobjdump; no GPU needed).

    python bench/cuda_sass.py ARTIFACT               # per kernel: instructions, registers, stack bytes and,
                                                     # for programmatic launches, the memory operations
                                                     # issued before griddepcontrol.wait (ACQBULK)
    python bench/cuda_sass.py ARTIFACT --sass NAME   # the SASS of the kernels whose name contains NAME
    python bench/cuda_sass.py LIB.so ...   --loops   # per kernel, its largest loop (a GEMV's main loop):
                                                     # instructions, 16-byte loads and dp4a (IDP) in it
    python bench/cuda_sass.py ARTIFACT --waits       # per kernel: global loads, and how often the code
                                                     # reads a load's register before the next load goes
                                                     # out (``load_waits``)

A programmatic launch may start while the kernel before it still runs, so what it reads before its wait
must be something no kernel writes (weights, the step's inputs): a GEMV built with ``pdl`` loads one
step group of weight rows there (4 operations), the split attention its block tables and older cache
rows. On 2026-11-27 this showed GEMVs loading their activations there too (``FERRUM_PDL``'s wrong logits).
"Before" is in address order: in a loop (a GEMV with prefetch) an operation placed before the wait may
run in a later iteration, after it; read such a kernel's SASS.

cuobjdump comes with the CUDA toolkit, or ``pip install nvidia-cuda-cuobjdump`` (the binary lands in
site-packages/nvidia/cu13/bin, where this looks too). Not a test.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_MEMORY = re.compile(r"\b(LDG|STG|ATOM|ATOMG|RED|LDGSTS)\b")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    wheel = sorted(Path(sysconfig.get_paths()["purelib"]).glob("nvidia/*/bin/cuobjdump"))
    if found or wheel:
        return found or str(wheel[-1])
    sys.exit("cuda_sass: cuobjdump not found; install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`")


def kernels_sass(sass: str) -> dict[str, list[str]]:
    """``{kernel: [instruction, ...]}`` from ``cuobjdump -sass`` output (the address comments dropped)."""
    out = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = part.split("\n", 1)
        out[name.strip()] = [re.sub(r"\s*/\*\s*0x[0-9a-f]+\s*\*/\s*$", "", ln).strip()
                             for ln in body.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    return out


def audit(instructions: list[str]) -> dict:
    """Instruction count and, where the kernel waits (ACQBULK), its index and the memory operations before."""
    wait = next((i for i, ins in enumerate(instructions) if "ACQBULK" in ins), None)
    before = [ins for ins in instructions[:wait] if _MEMORY.search(ins)] if wait is not None else []
    return {"instructions": len(instructions), "wait_at": wait, "memory_before_wait": before}


def largest_loop(instructions: list[str]) -> list[str]:
    """The instructions between a backward branch's target and the branch, for the longest such span."""
    def addr(ins: str) -> int:
        return int(ins[2:ins.index("*/")], 16)

    best: list[str] = []
    for ins in instructions:
        m = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr(ins):
            body = [x for x in instructions if int(m.group(1), 16) <= addr(x) <= addr(ins)]
            best = body if len(body) > len(best) else best
    return best


def load_waits(instructions: list[str]) -> tuple[int, int]:
    """``(global loads, waits)``: in address order, a wait is an instruction reading a register of a global
    load still unread while loads are outstanding, i.e. the code stops for data before it issues what
    comes next. A heuristic (branches and loops are read as straight code; a wait at a loop's end is
    counted once), for finding loads issued one round trip after another: a kernel staging a tile as
    load, store, load, store... waits once per load. On 2026-11-27 it found the decode and prefill
    attentions' key tiles staged so (24 and 27 waits; 10 and 11 after)."""
    loads = waits = 0
    pending: list[set[int]] = []  # registers of the loads not yet read
    for ins in instructions:
        body = re.sub(r"^/\*[0-9a-f]+\*/\s*", "", ins)
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
        op, _, operands = body.partition(" ")
        if op.startswith("LDG"):
            loads += 1
            m = re.match(r"\s*R(\d+)", operands)
            if m:
                width = 4 if ".128" in op else 2 if ".64" in op else 1
                pending.append(set(range(int(m.group(1)), int(m.group(1)) + width)))
            continue
        # the registers read: every operand of a store, the sources (after the first comma) of the rest
        sources = operands if op.startswith(("STS", "STG", "ST.")) else operands.partition(",")[2]
        if any(regs & {int(r) for r in re.findall(r"\bR(\d+)\b", sources)} for regs in pending):
            waits += 1
            pending = []
    return loads, waits


def usage(text: str) -> dict[str, dict[str, int]]:
    """``{kernel: {"REG": n, "STACK": n, ...}}`` from ``cuobjdump -res-usage``."""
    out = {}
    for name, fields in re.findall(r"Function (\S+?):\s*\n\s*(.+)", text):
        out[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, nargs="+", help="artifact directories or compiled libraries (.so)")
    ap.add_argument("--sass", metavar="NAME", help="print the SASS of the kernels whose name contains NAME")
    ap.add_argument("--loops", action="store_true", help="each kernel's largest loop: instructions and loads")
    ap.add_argument("--waits", action="store_true", help="each kernel's global loads and waits on them (load_waits)")
    args = ap.parse_args()
    for path in args.artifact:
        report(path if path.suffix == ".so" else path / "model.so", args.sass, args.loops, args.waits)


def report(library: Path, sass_of: str | None, loops: bool, waits: bool = False) -> None:
    from ferrum_runtime.fatbin import fatbins

    tool = cuobjdump()
    if not library.is_file():
        sys.exit(f"cuda_sass: no {library}; give an artifact directory or a compiled library")
    blobs = fatbins(library)
    if not blobs:
        sys.exit(f"cuda_sass: {library} holds no fatbin (not a CUDA library?)")
    with tempfile.TemporaryDirectory() as tmp:
        sass, res = {}, {}
        for i, blob in enumerate(blobs):
            path = Path(tmp) / f"{i}.fatbin"
            path.write_bytes(blob)
            sass.update(kernels_sass(subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                                                    check=True).stdout))
            res.update(usage(subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True,
                                            check=True).stdout))
    if sass_of:
        for name, ins in sass.items():
            if sass_of in name:
                print(f"# {name}\n" + "\n".join(ins) + "\n")
        return
    if loops:
        for name, ins in sorted(sass.items()):
            body = largest_loop(ins)
            loads = sum("LDG.E.128" in x for x in body)
            print(f"{library.name}: {name}: largest loop {len(body)} instructions, {loads} 16-byte loads, "
                  f"{sum('IDP' in x for x in body)} dp4a")
        return
    if waits:
        print("| kernel | global loads | waits on a load before the next |\n|---|---|---|")
        for name, ins in sorted(sass.items()):
            n, w = load_waits(ins)
            print(f"| {name} | {n} | {w} |")
        return
    print("| kernel | instructions | registers | stack B | wait at | memory ops before the wait |")
    print("|---|---|---|---|---|---|")
    for name, ins in sorted(sass.items()):
        a, r = audit(ins), res.get(name, {})
        wait = "-" if a["wait_at"] is None else str(a["wait_at"])
        print(f"| {name} | {a['instructions']} | {r.get('REG', '?')} | {r.get('STACK', '?')} | {wait} | "
              f"{len(a['memory_before_wait']) if a['wait_at'] is not None else '-'} |")


if __name__ == "__main__":
    main()
