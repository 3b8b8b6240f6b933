"""benchmarks/cost_model.py: the SASS counting on known snippets, the noise evaluations of the
model against the Triton kernels' source, and (with triton's NVIDIA backend) against the
compiled forward kernel: one evaluation of the noise per element in each direction. A kernel
that changes its noise passes must update the model and these numbers."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "cost_model.py"
_spec = importlib.util.spec_from_file_location("cost_model", SCRIPT)
cost_model = importlib.util.module_from_spec(_spec)
sys.modules["cost_model"] = cost_model  # dataclasses look their module up
_spec.loader.exec_module(cost_model)

# a loop (0x0010 .. 0x0090) with a branch around two instructions, then the exit
SNIPPET = """
        code for sm_90
                Function : toy_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD.WIDE.U32 R2, R4, -0x2daee0ad, RZ ;
        /*0020*/                   IMAD.MOV.U32 R5, RZ, RZ, R2 ;
        /*0030*/              @!P0 BRA 0x60 ;
        /*0040*/                   MUFU.LG2 R6, R6 ;
        /*0050*/                   FFMA R6, R6, R7, R8 ;
        /*0060*/                   MUFU.EX2 R9, R9 ;
        /*0070*/                   LDG.E.128 R12, desc[UR4][R2.64] ;
        /*0080*/                   STG.E.64 desc[UR4][R2.64], R12 ;
        /*0090*/               @P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0 ;
"""


def test_sass_parser_counts_mufu_multiplies_and_bytes_of_a_known_snippet():
    code = cost_model.parse_sass(SNIPPET)["toy_kernel"]
    assert [i.opcode for i in code[:3]] == ["MOV", "IMAD.WIDE.U32", "IMAD.MOV.U32"]
    assert code[3].predicate == "@!P0"
    # the trap at the end is not a loop; the back edge at 0x90 is
    assert cost_model.loops(code) == [(1, 9)]
    longest, path = cost_model.path_counts(code, 1, 9)
    assert path == list(range(1, 10))  # through the two optional instructions
    assert longest["mufu"] == 2 and longest["mufu.lg2"] == 1 and longest["mufu.ex2"] == 1
    assert longest["imad_mul"] == 1 and longest["philox_mul"] == 1
    assert longest["imad_other"] == 1  # IMAD.MOV is a move, not a multiply
    assert longest["fp32"] == 1
    assert longest["read_bytes"] == 16 and longest["write_bytes"] == 8
    assert longest["issue"] == 9
    shortest, path = cost_model.path_counts(code, 1, 9, longest=False)
    assert path == [1, 2, 3, 6, 7, 8, 9]
    assert shortest["mufu"] == 1 and shortest["fp32"] == 0


def test_region_counts_add_the_trips_of_nested_loops():
    # an outer loop 0x10 .. 0x60 around an inner loop 0x20 .. 0x40 that runs 5 times
    text = """
        Function : nest
        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   MUFU.EX2 R3, R3 ;
        /*0020*/                   MUFU.LG2 R4, R4 ;
        /*0030*/                   FADD R4, R4, R5 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FMUL R3, R3, R4 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
    """
    code = cost_model.parse_sass(text)["nest"]
    assert cost_model.loops(code) == [(1, 6), (2, 4)]
    region = cost_model.Region(0, elements=2, trips={1: 5})
    counts = cost_model.region_counts(code, region)
    assert counts["mufu.ex2"] == 1 and counts["mufu.lg2"] == 5
    assert counts["fp32"] == 5 + 1
    assert counts["issue"] == 6 + 4 * 3


def _noise_calls(functions: dict[str, ast.FunctionDef], name: str) -> int:
    """Calls of the noise generators reached from function ``name``, through helpers: each call
    site evaluates the noise of every element it covers once."""
    total = 0
    for node in ast.walk(functions[name]):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = node.func.id
            if callee in ("gumbel_noise_row", "gumbel_noise_tile"):
                total += 1
            elif callee in functions and callee != name:
                total += _noise_calls(functions, callee)
    return total


def test_noise_evaluations_of_the_model_match_the_triton_kernels_source():
    functions = {}
    for module in ("gumbel_softmax.py", "gumbel_softmax_embedding.py", "ppo_loss.py"):
        tree = ast.parse((ROOT / "kernels" / module).read_text())
        functions.update({f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)})
    from_source = {
        label: _noise_calls(functions, kernel.name)
        for label, kernel in cost_model.TRITON_KERNELS.items()
    }
    model = {label: kernel.noise for label, kernel in cost_model.TRITON_KERNELS.items()}
    assert model == from_source
    # one evaluation of the noise per element in each direction, in each op
    assert from_source == {
        "triton fwd": 1,
        "triton bwd_from_logits": 1,
        "triton bwd": 0,
        "triton ppo": 0,
        "triton emb chunk probs": 1,
        "triton emb product": 0,
        "triton emb bwd_logits": 1,
    }
    for case in cost_model.CASES:
        for direction in ("fwd", "bwd"):
            kernels = [cost_model.TRITON_KERNELS.get(label) for label in case.kernels]
            noise = sum(k.noise for k in kernels if k is not None and k.direction == direction)
            assert noise == (1 if case.op.startswith("gumbel") else 0), (case, direction)


def test_prediction_takes_each_kernels_slowest_limit():
    counts = {
        "f": {"direction": "fwd", "noise": 1, "issue": 100.0, "dram_bytes": 1.0},
        "b": {"direction": "bwd", "noise": 1, "issue": 1.0, "dram_bytes": 100.0},
    }
    case = cost_model.Case("op", 1000, 1000, "triton", ("f", "b"))
    p = cost_model.predict(case, counts)
    assert p["kernels"]["f"]["H100 SXM"]["limit"] == "issue"
    assert p["kernels"]["b"]["H100 SXM"]["limit"] == "memory"
    issue_s = 1e6 * 100 / (128 * cost_model.SMS * cost_model.CLOCK_HZ)
    memory_s = 1e6 * 100 / (3.35e12 * cost_model.HBM_FRACTION)
    assert p["H100 SXM ms"] == pytest.approx((issue_s + memory_s) * 1e3)
    # the H200 shares the H100's compute limits and has more bandwidth
    assert p["kernels"]["f"]["H200"]["ms"] == pytest.approx(issue_s * 1e3)
    assert p["kernels"]["b"]["H200"]["ms"] < p["kernels"]["b"]["H100 SXM"]["ms"]


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="triton with its NVIDIA backend is not installed",
)
def test_compiled_triton_forward_makes_noise_once_per_element():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--fwd-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["noise"] == 1 and counts["noise_from_code"] == 1
    # two hardware logarithms per evaluation, and a Philox call's multiplies per element
    assert counts["mufu.lg2"] == pytest.approx(2.0)
    assert 4 <= counts["philox_mul_per_evaluation"] <= 10
    # the bf16 row read once, the staged exponentials written and read back, the result
    # written, and each thread's 4-byte block max stored and loaded once per 16 elements
    assert counts["read_bytes"] == pytest.approx(4.25)
    assert counts["write_bytes"] == pytest.approx(4.25)
