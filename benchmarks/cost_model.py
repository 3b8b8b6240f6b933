"""An offline GPU cost model of the Gumbel-Softmax kernels (and the PPO-from-logits kernel) for
an H100 SXM (sm_90), built from the compiled code on a machine without a GPU.

    python benchmarks/cost_model.py [--out benchmarks/results/cost-model-sm90]

What it does:
1. compiles the Triton kernels for sm_90 through their real launchers with the launch replaced
   by compilation (benchmarks/triton_compile_check.py), at the benchmark's dtype (bf16) and
   block sizes;
2. disassembles each cubin (``cuobjdump -sass``) and counts, per element of the [N, V] logits,
   per kernel: the noise evaluations (how often each element's Philox + logarithms are
   computed), special-function instructions (MUFU.*), integer multiplies (IMAD.WIDE/IMAD.HI:
   Philox's 32 x 32 -> 64 products; other IMADs are counted apart, since the compiler also uses
   IMAD for moves and shifts), FP32 FMA/ADD/MUL, other integer/compare ALU instructions, all
   instructions issued, and the global bytes read and written (LDG/STG widths);
3. turns the counts into a predicted time per benchmark case (forward + backward) at the H100's
   published throughputs, says which limit binds, and puts the measured H200 times beside it.

How the counts are made. A kernel's code is a set of regions: a loop body (found from the
backward branches of the SASS) or the whole kernel without its back edges. Each region's
instructions are counted along one path through it (its longest path, the one that takes the
soft sample and the general load paths where a kernel branches), with the loops inside it
counted once per trip; the kernel table below says, for each region, how many [N, V] elements
one thread covers per execution and how many times each element is covered (derived from the
kernels' source and launch configuration: block sizes, warps, grids). Per element = count x
repeats / elements. The noise evaluations come from the same structure (the passes that make
noise) and are checked against the code: a region makes noise if its path holds Philox's
multiplies (the immediates 0xD2511F53 and 0xCD9E8D57), about 5 per element per evaluation (20
per call of 4 columns; fewer where the compiler hoists row-uniform rounds to the uniform
datapath, which does not count here).

Throughputs (per SM per clock, H100 SXM5 = compute capability 9.0), and their sources:
- 132 SMs, 1.98 GHz boost: NVIDIA H100 datasheet / Hopper whitepaper (67 TFLOP/s FP32 =
  132 x 128 x 2 x 1.98e9).
- FP32 FMA/ADD/MUL 128, MUFU (lg2, ex2, rcp, ...) 16, 32-bit integer multiply / multiply-add
  (IMAD, all variants) 64, compare/min/max, bitwise, integer add and shift 64: the CUDA C++
  Programming Guide, "Arithmetic Instructions" throughput table, column 9.0. Assumption: an
  IMAD.WIDE (both halves of the product) costs one IMAD issue, as that table counts
  "extended-precision multiply-add" with the multiplies.
- Issue: 4 warp schedulers per SM, one warp instruction per clock each (Hopper whitepaper):
  128 thread-instructions per clock per SM over all instructions.
- Memory: HBM3 3.35 TB/s (H100 SXM5 datasheet) at a practical 90% (3.0 TB/s); the H200 column
  uses 4.8 TB/s at 90% (the same GH100 chip, so its compute limits equal the H100's). Bytes are
  those the loads and stores request, with no credit for L2 hits (the second pass of a row
  kernel may find part of its row in L2): an upper bound of the DRAM traffic.
- Tensor cores (the embedding's products): 989 TFLOP/s dense bf16 (H100 SXM5 datasheet).
The predicted time of a kernel is its slowest limit (perfect overlap of the others), a lower
bound; a case's time is the sum over its kernels. Measured H200 times come from
benchmarks/results/h200-2026-11-27 (triton 3.6 there; this script compiles with the installed
triton, whose code may differ).

Tools: triton with its NVIDIA backend, and cuobjdump, which the triton wheel ships
(triton/backends/nvidia/bin); elsewhere ``pip install nvidia-cuda-cuobjdump`` provides it (or
set CUOBJDUMP to its path). A missing tool skips the kernels with a message. Not a measurement:
no GPU runs anything here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# Device limits (see the module docstring for sources)
# ----------------------------------------------------------------------------------------------

SMS = 132
CLOCK_HZ = 1.98e9
PER_CLOCK_PER_SM = {"mufu": 16, "imad": 64, "fp32": 128, "alu": 64, "issue": 128}
HBM_BYTES_PER_S = {"H100 SXM": 3.35e12, "H200": 4.8e12}
HBM_FRACTION = 0.9
TENSOR_FLOPS_PER_S = 989e12

PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_MULS_PER_ELEMENT = 5  # 10 rounds x 2 products per call of 4 columns

# ----------------------------------------------------------------------------------------------
# SASS parsing and counting
# ----------------------------------------------------------------------------------------------

_FUNCTION = re.compile(r"Function : (\S+)")
_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);"
)
_ALU = (
    "LOP3",
    "LOP",
    "IADD3",
    "IADD",
    "VIADD",
    "SHF",
    "SHL",
    "SHR",
    "ISETP",
    "FSETP",
    "FMNMX",
    "IMNMX",
    "VIMNMX",
    "SEL",
    "FSEL",
    "LEA",
    "PRMT",
    "PLOP3",
    "IABS",
)


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: byte address, predicate guard ('' if none), opcode with its
    modifiers (``IMAD.WIDE.U32``) and operand text."""

    address: int
    predicate: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Instructions of each function of ``cuobjdump -sass`` output, by (mangled) name."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        header = _FUNCTION.search(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.search(line)
        if match and current is not None:
            address, predicate, opcode, operands = match.groups()
            current.append(
                Instruction(int(address, 16), (predicate or "").strip(), opcode, operands.strip())
            )
    return functions


def _global_bytes(instruction: Instruction) -> int:
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    for modifier in instruction.opcode.split(".")[1:]:
        if modifier in widths:
            return widths[modifier]
    return 4


def _is_philox_multiply(instruction: Instruction) -> bool:
    if not instruction.opcode.startswith("IMAD"):
        return False
    for literal in re.findall(r"-?0x[0-9a-f]+", instruction.operands):
        if int(literal, 16) & 0xFFFFFFFF in PHILOX_MULTIPLIERS:
            return True
    return False


def classify(instruction: Instruction) -> Counter:
    """Per-thread counts of one instruction: 'issue' (every instruction) and the classes the
    model limits or reports (mufu, imad_mul, imad_other, fp32, alu, tensor, philox_mul,
    read_bytes, write_bytes). Uniform-datapath (U*) instructions run once per warp, off the
    per-thread pipes, and count only as issue."""
    counts: Counter = Counter(issue=1)
    op, base = instruction.opcode, instruction.base
    if base == "MUFU":
        counts["mufu"] += 1
        counts["mufu." + op.split(".")[1].lower()] += 1
    elif base == "IMAD":
        # IMAD.MOV/SHL/IADD/X are moves, shifts and adds the compiler puts on the IMAD pipe
        mul = not op.startswith(("IMAD.MOV", "IMAD.SHL", "IMAD.IADD", "IMAD.X"))
        counts["imad_mul" if mul else "imad_other"] += 1
        counts["philox_mul"] += _is_philox_multiply(instruction)
    elif base in ("FFMA", "FADD", "FMUL"):
        counts["fp32"] += 1
    elif base in _ALU:
        counts["alu"] += 1
    elif base in ("HMMA", "HGMMA", "IMMA", "DMMA"):
        counts["tensor"] += 1
    elif base in ("LDG", "LDGSTS"):
        counts["read_bytes"] += _global_bytes(instruction)
    elif base == "STG":
        counts["write_bytes"] += _global_bytes(instruction)
    return counts


def _branch_target(instruction: Instruction) -> int | None:
    if instruction.base != "BRA":
        return None
    match = re.search(r"0x([0-9a-f]+)", instruction.operands)
    return int(match.group(1), 16) if match else None


def loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """(header, latch) instruction indices of each loop, ordered by header address: a branch to
    an earlier (or its own) address closes a loop from its target to itself."""
    index = {instruction.address: i for i, instruction in enumerate(code)}
    found = []
    for i, instruction in enumerate(code):
        target = _branch_target(instruction)
        # a branch to itself is the trap that ends the code, not a loop
        if target is not None and target < instruction.address and target in index:
            found.append((index[target], i))
    return sorted(found, key=lambda loop: (loop[0], -loop[1]))


def path_counts(
    code: list[Instruction], start: int, end: int, longest: bool = True
) -> tuple[Counter, list[int]]:
    """Class counts along the longest (or shortest) path of instructions from index start to
    index end, through forward edges only (a back edge inside is left by falling through: each
    inner loop body is on the path once). Returns the counts and the path's indices."""
    address_index = {code[i].address: i for i in range(start, end + 1)}
    # instructions are in address order and every followed edge goes forward: one sweep
    best: dict[int, tuple[int, int]] = {start: (1, -1)}  # index -> (path length, predecessor)
    for i in range(start, end):
        if i not in best:
            continue
        instruction = code[i]
        successors = []
        target = _branch_target(instruction)
        if target is not None and target > instruction.address and target in address_index:
            successors.append(address_index[target])
        # a back edge is left by falling through (one trip of each inner loop), and so is a
        # jump out of the range (to cold code placed after the end)
        unconditional = (instruction.base in ("EXIT", "RET") and not instruction.predicate) or (
            instruction.base == "BRA"
            and not instruction.predicate
            and target is not None
            and target in address_index
            and target > instruction.address
        )
        if not unconditional:
            successors.append(i + 1)
        length = best[i][0] + 1
        for j in successors:
            if j not in best or (length > best[j][0] if longest else length < best[j][0]):
                best[j] = (length, i)
    if end not in best:
        raise ValueError(f"no path from instruction {start} to {end}")  # a malformed listing
    path, i = [], end
    while i != -1:
        path.append(i)
        i = best[i][1]
    path.reverse()
    counts: Counter = Counter()
    for i in path:
        counts.update(classify(code[i]))
    return counts, path


def kernel_loops(code: list[Instruction]) -> list[tuple[int, int]]:
    """The kernel's loops: those before the trap that ends its code (the code after it is
    padding or called subroutines). A loop's latch may follow the last EXIT (a persistent loop
    over rows that exits from its top)."""
    trap = next(
        (
            i
            for i, instruction in enumerate(code)
            if _branch_target(instruction) == instruction.address
        ),
        len(code),
    )
    return [loop for loop in loops(code) if loop[1] < trap]


def last_exit(code: list[Instruction]) -> int:
    """Index of the kernel's last EXIT (the code after it is padding or called subroutines)."""
    return max(i for i, instruction in enumerate(code) if instruction.base == "EXIT")


# ----------------------------------------------------------------------------------------------
# Compiling and disassembling
# ----------------------------------------------------------------------------------------------


def cuobjdump() -> str | None:
    """Path of cuobjdump: $CUOBJDUMP, the PATH, or the copy in the triton wheel."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no triton, or one without the bundled tools
        return None


def disassemble(cubin: bytes | Path) -> dict[str, list[Instruction]]:
    """SASS of every function of a cubin (bytes or a file)."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError(
            "cuobjdump not found: install triton (its wheel ships it) or "
            "`pip install nvidia-cuda-cuobjdump`, or set CUOBJDUMP"
        )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(cubin) if isinstance(cubin, Path) else Path(folder) / "kernel.cubin"
        if not isinstance(cubin, Path):
            path.write_bytes(cubin)
        result = subprocess.run(
            [tool, "-sass", str(path)], capture_output=True, text=True, check=True
        )
    return parse_sass(result.stdout)


def compile_triton(shapes: dict[str, int], arch: int = 90) -> dict[str, list[Instruction]]:
    """SASS of the Triton kernels of the model's cases, each compiled through its launcher for
    sm_<arch> (nothing runs). Keys: the ``TRITON_KERNELS`` labels. Changes this process for good:
    call it in a process of its own (the script's main does)."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from triton_compile_check import compile_only

    compiled = compile_only(arch)
    from rlgaf_fast.kernels import gumbel_softmax as gs
    from rlgaf_fast.kernels import gumbel_softmax_embedding as gse
    from rlgaf_fast.kernels import ppo_loss as pl

    bf16 = torch.bfloat16
    out: dict[str, list[Instruction]] = {}

    def run(labels: list[str], thunk) -> None:
        before = len(compiled)
        thunk()
        kernels = compiled[before:]
        if [name for name, _ in kernels] != [TRITON_KERNELS[label].name for label in labels]:
            raise RuntimeError(f"expected kernels {labels}, compiled {[n for n, _ in kernels]}")
        for label, (name, kernel) in zip(labels, kernels, strict=True):
            out[label] = disassemble(kernel.asm["cubin"])[name]

    rows, V = shapes["rows"], shapes["V"]
    x = torch.randn(rows, V).to(bf16)
    wanted = shapes.get("only")
    if wanted in (None, "gumbel_softmax"):
        run(["triton fwd"], lambda: gs.gumbel_softmax_fwd(x, 0.7, False, 3))
    if wanted is None:
        run(["triton bwd_from_logits"], lambda: gs.gumbel_softmax_bwd_from_logits(x, x, 0.7, 3))
        run(["triton bwd"], lambda: gs.gumbel_softmax_bwd(x, x, 0.7))
        actions = torch.zeros(rows, dtype=torch.int64)
        z = torch.zeros(rows)
        run(
            ["triton ppo"],
            lambda: pl.ppo_loss_fwd_grad(
                x, actions, z, z, None, z + 1, 0.8, 1.2, 0.0, 0.0, 0, 0.01, 1.0, torch.empty_like(x)
            ),
        )
        # the embedding kernels' code depends on D and the dtypes (block sizes) and on integer
        # arguments being multiples of 16, not on N or V: a small vocabulary keeps the CPU
        # tensors and the weight gradient's torch.mm small
        ev, D = shapes["embedding_V"], shapes["D"]
        xe = torch.randn(rows, ev).to(bf16)
        w = torch.randn(ev, D).to(bf16)

        def embedding():
            result, _, lse = gse.gumbel_softmax_embedding_fwd(xe, w, 0.7, 3)
            gse.gumbel_softmax_embedding_bwd(
                torch.randn_like(result), xe, w, result, lse, 0.7, 3, True
            )

        run(["triton emb chunk probs", "triton emb product", "triton emb bwd_logits"], embedding)
    return out


# ----------------------------------------------------------------------------------------------
# The kernels' structure: which code covers the [N, V] elements, how often
# ----------------------------------------------------------------------------------------------

D_EMB = 2048  # the embedding case's width


@dataclass(frozen=True)
class Region:
    """Code that covers [N, V] elements: loop ``loop`` (index into loops(code)) or the whole
    kernel (None); ``elements`` per thread per execution; ``repeats`` executions covering each
    element; ``trips``: loops nested in it (index -> trips per execution)."""

    loop: int | None
    elements: float
    repeats: float = 1.0
    trips: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Kernel:
    """A compiled kernel of the model: its name, the
    direction it serves, how many loops its code must have (a changed kernel fails loudly),
    the regions, the noise evaluations per element that its source implies, and, for tile
    kernels whose loads re-read tiles that L2 holds, the DRAM bytes per element (its [N, V]
    inputs and outputs once; None: the bytes its loads and stores request)."""

    name: str
    direction: str
    loops: int
    regions: tuple[Region, ...]
    noise: float
    dram_bytes: float | None = None


# Triton row kernels: BLOCK 4096 columns, 8 warps (GPU_ROW_CONFIG): 16 elements a thread per
# iteration of a column loop; loop 0 is the persistent loop over rows.
_ROW = 16.0
TRITON_KERNELS: dict[str, Kernel] = {
    "triton fwd": Kernel(
        "_gumbel_softmax_fwd_kernel", "fwd", 3, (Region(1, _ROW), Region(2, _ROW)), 1
    ),
    "triton bwd_from_logits": Kernel(
        "_gumbel_softmax_bwd_from_logits_kernel", "bwd", 3, (Region(1, _ROW), Region(2, _ROW)), 1
    ),
    "triton bwd": Kernel(
        "_gumbel_softmax_bwd_kernel", "bwd", 3, (Region(1, _ROW), Region(2, _ROW)), 0
    ),
    # PPO: one program per row, BLOCK 2048, 8 warps (ppo_loss._block): 8 elements a thread
    "triton ppo": Kernel("_ppo_loss_kernel", "fwd+bwd", 2, (Region(0, 8), Region(1, 8)), 0),
    # chunk probabilities: [16 rows, 256 columns] a step, 8 warps; loop 0 makes the noise and
    # stages, loop 1 rescales
    "triton emb chunk probs": Kernel(
        "_embedding_chunk_probs_kernel", "fwd", 2, (Region(0, 16), Region(1, 16)), 1
    ),
    # product: [64 rows, 32 vocabulary] of p per K step and program, 8 warps; D / 256 programs
    # cover each element
    "triton emb product": Kernel(
        "_embedding_product_kernel",
        "fwd",
        1,
        (Region(0, 64 * 32 / 256, D_EMB / 256),),
        0,
        dram_bytes=4,  # p_hi and p_lo once; the weight chunk stays in L2
    ),
    # grad_logits: a [64, 64] tile a program, 8 warps, a K-loop of D / 64 steps, then the noise
    "triton emb bwd_logits": Kernel(
        "_embedding_bwd_logits_kernel",
        "bwd",
        1,
        (Region(None, 16), Region(0, 16, D_EMB / 64 - 1)),
        1,
        dram_bytes=6,  # logits in, grad_logits and p out; weight and grad_out tiles from L2
    ),
}

# Analytic tensor-core FLOPs per [N, V] element where a product runs on them (2 per
# multiply-add): the forward product's two dots (p_hi and p_lo), the grad_logits dot, and the
# weight gradient, which cuBLAS computes (no SASS here: its FLOPs and the bytes of reading the
# probabilities it multiplies).
TENSOR_FLOPS = {"triton emb product": 4 * D_EMB, "triton emb bwd_logits": 2 * D_EMB}
CUBLAS_WEIGHT_GRAD = {"tensor_flops": 2 * D_EMB, "read_bytes": 2}


@dataclass(frozen=True)
class Case:
    """A benchmark case: op, sizes, backend, its kernels (forward and backward), the measured
    H200 time (ms, fwd+bwd median) where one exists, and this model's H100 prediction for the
    kernels that time was measured with, where they differ from today's (the Gumbel-Softmax
    kernels then evaluated the noise twice per element and direction)."""

    op: str
    N: int
    V: int
    backend: str
    kernels: tuple[str, ...]
    measured_ms: float | None = None
    measured_source: str = ""
    eager_ms: float | None = None
    measured_kernels_predicted_ms: float | None = None


_RUN3 = "h200-2026-11-27/run3-a4218d5"
_GS_TRITON = ("triton fwd", "triton bwd_from_logits")
CASES = (
    Case("gumbel_softmax", 8192, 128256, "triton", _GS_TRITON, 12.449, _RUN3, 13.012, 8.31),
    Case("gumbel_softmax", 8192, 32000, "triton", _GS_TRITON, 3.097, _RUN3, 3.350, 2.07),
    Case("gumbel_softmax", 8192, 151936, "triton", _GS_TRITON, 14.792, _RUN3, 15.362, 9.84),
    Case("ppo_loss clip+entropy", 16384, 128256, "triton", ("triton ppo",), 4.948, _RUN3, 75.616),
    Case("ppo_loss clip+entropy", 4096, 128256, "triton", ("triton ppo",), 2.233, _RUN3, 19.087),
    Case(
        f"gumbel_softmax_embedding D={D_EMB}",
        4096,
        128256,
        "triton",
        (
            "triton emb chunk probs",
            "triton emb product",
            "triton emb bwd_logits",
            "cublas weight grad",
        ),
        None,
        "",
        14.6,
        15.8,
    ),
)

COUNTED = (
    "noise",
    "philox_mul",
    "mufu",
    "mufu.lg2",
    "mufu.ex2",
    "imad_mul",
    "imad_other",
    "fp32",
    "alu",
    "issue",
    "read_bytes",
    "write_bytes",
    "tensor_flops",
)

# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def region_counts(code: list[Instruction], region: Region) -> Counter:
    """Per-thread counts of one execution of a region (its nested loops once per trip)."""
    found = kernel_loops(code)
    start, end = (0, last_exit(code)) if region.loop is None else found[region.loop]
    counts, _ = path_counts(code, start, end)
    for nested, trips in region.trips.items():
        inner, _ = path_counts(code, *found[nested])
        for key, value in inner.items():
            counts[key] += (trips - 1) * value
    return counts


def per_element(code: list[Instruction], kernel: Kernel) -> dict[str, float]:
    """Counts per [N, V] element of one kernel, and its noise evaluations read from the code
    (regions whose path holds Philox's multiplies) beside those its structure implies."""
    found = kernel_loops(code)
    if len(found) != kernel.loops:
        raise RuntimeError(
            f"{kernel.name}: expected {kernel.loops} loops in the SASS, found {len(found)}: "
            "the kernel changed; update its regions in the model"
        )
    totals: Counter = Counter()
    noise_from_code = 0.0
    noise_muls = 0.0
    for region in kernel.regions:
        counts = region_counts(code, region)
        scale = region.repeats / region.elements
        for key, value in counts.items():
            totals[key] += value * scale
        direct, _ = path_counts(
            code, *((0, last_exit(code)) if region.loop is None else found[region.loop])
        )
        # a Philox call (4 columns) has 40 multiplies, fewer where rounds are hoisted
        if direct["philox_mul"] / region.elements >= 4:
            noise_from_code += region.repeats
            noise_muls += direct["philox_mul"] / region.elements * region.repeats
    result = {key: float(totals[key]) for key in COUNTED if key not in ("noise", "tensor_flops")}
    result["noise"] = float(kernel.noise)
    result["noise_from_code"] = noise_from_code
    result["philox_mul_per_evaluation"] = noise_muls / noise_from_code if noise_from_code else 0.0
    return result


def kernel_times(counts: dict[str, float], elements: int, hbm: float) -> dict[str, float]:
    """Seconds at each limit for ``elements`` [N, V] elements."""
    rate = SMS * CLOCK_HZ
    return {
        "mufu": elements * counts.get("mufu", 0) / (PER_CLOCK_PER_SM["mufu"] * rate),
        "integer": elements
        * (counts.get("imad_mul", 0) + counts.get("imad_other", 0))
        / (PER_CLOCK_PER_SM["imad"] * rate),
        "fp32": elements * counts.get("fp32", 0) / (PER_CLOCK_PER_SM["fp32"] * rate),
        "alu": elements * counts.get("alu", 0) / (PER_CLOCK_PER_SM["alu"] * rate),
        "issue": elements * counts.get("issue", 0) / (PER_CLOCK_PER_SM["issue"] * rate),
        "memory": elements * counts.get("dram_bytes", 0) / (hbm * HBM_FRACTION),
        "tensor": elements * counts.get("tensor_flops", 0) / TENSOR_FLOPS_PER_S,
    }


def predict(case: Case, counts: dict[str, dict]) -> dict:
    """Predicted time of a case (sum over its kernels of the slowest limit), H100 SXM and
    H200."""
    elements = case.N * case.V
    result: dict = {"kernels": {}}
    for device, hbm in HBM_BYTES_PER_S.items():
        total = 0.0
        for label in case.kernels:
            times = kernel_times(counts[label], elements, hbm)
            limit = max(times, key=times.get)
            total += times[limit]
            entry = result["kernels"].setdefault(label, {})
            entry[device] = {"ms": times[limit] * 1e3, "limit": limit}
            if device == "H100 SXM":
                entry["limits_ms"] = {k: v * 1e3 for k, v in times.items()}
        result[device + " ms"] = total * 1e3
    return result


def model_counts(arch: int = 90) -> tuple[dict[str, dict], list[str]]:
    """Per-element counts of every kernel the cases use (those whose toolchain is present),
    and notes on what was skipped."""
    counts: dict[str, dict] = {}
    notes: list[str] = []
    try:
        code = compile_triton({"rows": 16, "V": 128256, "embedding_V": 4096, "D": D_EMB}, arch)
    except (ImportError, RuntimeError) as error:
        code = {}
        notes.append(f"Triton kernels skipped: {error}")
    for label, kernel in TRITON_KERNELS.items():
        if label in code:
            counts[label] = per_element(code[label], kernel)
            counts[label]["direction"] = kernel.direction
            counts[label]["tensor_flops"] = float(TENSOR_FLOPS.get(label, 0))
            requested = counts[label]["read_bytes"] + counts[label]["write_bytes"]
            counts[label]["dram_bytes"] = (
                requested if kernel.dram_bytes is None else float(kernel.dram_bytes)
            )
    if "triton emb product" in counts:
        counts["cublas weight grad"] = {
            "direction": "bwd",
            "noise": 0.0,
            "dram_bytes": float(CUBLAS_WEIGHT_GRAD["read_bytes"]),
            **{key: float(value) for key, value in CUBLAS_WEIGHT_GRAD.items()},
        }
    return counts, notes


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def render_markdown(doc: dict) -> str:
    """The Markdown report of the JSON document ``main`` writes."""
    lines = [
        "# Offline cost model of the Gumbel-Softmax kernels for sm_90 (no GPU)",
        "",
        f"Written by `python benchmarks/cost_model.py` ({doc['versions']}), on a CPU machine: "
        "every number below is a prediction from compiled code and published throughputs, "
        "except the measured H200 column. Method, sources and assumptions: the script's "
        "docstring. Limits per SM per clock: "
        + ", ".join(f"{k} {v}" for k, v in PER_CLOCK_PER_SM.items())
        + f"; {SMS} SMs at {CLOCK_HZ / 1e9:.2f} GHz; HBM {HBM_FRACTION:.0%} of 3.35 TB/s "
        "(H100 SXM) or 4.8 TB/s (H200); tensor cores 989 TFLOP/s.",
        "",
        "## Per element of [N, V], per kernel",
        "",
        "Per-thread instructions per element (bf16; `noise`: evaluations of an element's "
        "Philox + logarithms, from the kernel's structure, `from code`: the passes whose SASS "
        "holds Philox's multiplies; `Philox muls/eval`: those multiplies per element and "
        "evaluation; read/written: bytes requested by loads and stores, from L2 or DRAM; DRAM: "
        "the bytes the memory limit uses, the requested ones for row kernels and the [N, V] "
        "inputs and outputs once for tile kernels, whose re-read tiles L2 holds).",
        "",
        "| kernel | dir | noise | from code | Philox muls/eval | MUFU (lg2, ex2) | IMAD mul | "
        "IMAD other | FP32 | ALU | issued | read B | written B | DRAM B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, c in doc["kernels"].items():
        if label == "cublas weight grad":
            continue
        lines.append(
            f"| {label} | {c['direction']} | {_fmt(c['noise'])} | {_fmt(c['noise_from_code'])} "
            f"| {_fmt(c['philox_mul_per_evaluation'])} | {_fmt(c['mufu'])} "
            f"({_fmt(c['mufu.lg2'])}, {_fmt(c['mufu.ex2'])}) | {_fmt(c['imad_mul'])} "
            f"| {_fmt(c['imad_other'])} | {_fmt(c['fp32'])} | {_fmt(c['alu'])} "
            f"| {_fmt(c['issue'])} | {_fmt(c['read_bytes'])} | {_fmt(c['write_bytes'])} "
            f"| {_fmt(c['dram_bytes'])} |"
        )
    lines += [
        "",
        "## Predicted time per case, forward + backward",
        "",
        "Sum over the case's kernels of each kernel's slowest limit (the limit named per "
        "kernel, H100 SXM). Measured: the median of the H200 benchmark run named, which ran "
        "earlier kernels: the Gumbel-Softmax ones then evaluated the noise twice per element "
        "and direction, and this model predicted the time in the last column for them (H100; "
        "the measured / predicted ratio of that prediction on the H200 was 1.50 for the row "
        "op). Today's kernels are unmeasured.",
        "",
        "| case | backend | kernels: predicted H100 ms (binding limit) | predicted H100 SXM ms "
        "| predicted H200 ms | measured H200 ms (earlier kernels) | earlier kernels, predicted "
        "H100 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in doc["cases"]:
        p = case["predicted"]
        kernels = "; ".join(
            f"{label} {_fmt(k['H100 SXM']['ms'])} ({k['H100 SXM']['limit']})"
            for label, k in p["kernels"].items()
        )
        measured = case["measured_ms"]
        source = f"{_fmt(measured)} ({case['measured_source']})" if measured else "not measured"
        earlier = case["measured_kernels_predicted_ms"]
        earlier = _fmt(earlier) if earlier else "same kernels"
        lines.append(
            f"| {case['op']} [{case['N']}, {case['V']}] | {case['backend']} | {kernels} "
            f"| {_fmt(p['H100 SXM ms'])} | {_fmt(p['H200 ms'])} | {source} | {earlier} |"
        )
    if doc["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cost-model-sm90")
    parser.add_argument(
        "--fwd-only",
        action="store_true",
        help="compile only the Triton forward kernel at a small vocabulary and print its "
        "per-element counts as JSON (a quick check of the pipeline)",
    )
    args = parser.parse_args()
    if args.fwd_only:
        code = compile_triton({"rows": 4, "V": 1024, "only": "gumbel_softmax"}, args.arch)
        kernel = TRITON_KERNELS["triton fwd"]
        # V = 1024: BLOCK 1024 and 2 warps, so still 16 elements a thread
        print(json.dumps(per_element(code["triton fwd"], kernel)))
        return 0
    import torch
    import triton

    counts, notes = model_counts(args.arch)
    notes.append(
        "The measured H200 times used triton 3.6 (the GPU image's); the Triton code counted "
        "here comes from the installed triton, named above. The H200 runs' copy ceiling was "
        "4.3 TB/s measured (read + write)."
    )
    cases = []
    for case in CASES:
        if not all(label in counts for label in case.kernels):
            notes.append(f"{case.op} [{case.N}, {case.V}] {case.backend}: kernels missing")
            continue
        entry = {
            "op": case.op,
            "N": case.N,
            "V": case.V,
            "backend": case.backend,
            "kernels": list(case.kernels),
            "measured_ms": case.measured_ms,
            "measured_source": case.measured_source,
            "eager_ms_h200": case.eager_ms,
            "predicted": predict(case, counts),
            "measured_kernels_predicted_ms": case.measured_kernels_predicted_ms,
        }
        cases.append(entry)
    doc = {
        "versions": f"triton {triton.__version__}, torch {torch.__version__}, "
        f"target sm_{args.arch}",
        "kernels": counts,
        "cases": cases,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost_model.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "README.md").write_text(render_markdown(doc))
    print(render_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
