"""The benchmark run: for every case and provider, one call whose peak memory is measured and
whose outputs and gradients are checked against the reference (also the warm-up; torch.compile
first gets one compiling call), then the timed calls; then speed-ups, memory ratios and
fractions of the measured ceilings are derived and the reports written.

A provider that fails (a backend not built yet, out of memory, a compile error) becomes an error
row and the run goes on. Results are written after every case, so an interrupted run (a
timeout on the GPU machine) still leaves its finished rows on disk.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import re
import subprocess
import time
import traceback
from pathlib import Path

import torch

from rlgaf_fast.bench import cases as cases_module
from rlgaf_fast.bench import measure, report
from rlgaf_fast.bench import peers as peer_cases
from rlgaf_fast.bench.cases import Case
from rlgaf_fast.bench.presets import BASELINES, FUSED, PEERS, Goal, select

# The source checkout this package runs from (an editable install); installed into
# site-packages, the current directory instead, so that results and the commit are the user's.
REPO_ROOT = Path(__file__).resolve().parents[2]
if not (REPO_ROOT / "setup.py").exists():
    REPO_ROOT = Path.cwd()

# Repeats and time budget per provider and case, by preset.
TIMING = {
    "tiny": {"min_repeats": 2, "max_repeats": 3, "budget_s": 0.2},
    "quick": {"min_repeats": 3, "max_repeats": 10, "budget_s": 1.0},
    "full": {"min_repeats": 5, "max_repeats": 50, "budget_s": 3.0},
    "goals": {"min_repeats": 5, "max_repeats": 30, "budget_s": 2.0},
    "peers": {"min_repeats": 3, "max_repeats": 20, "budget_s": 5.0},
}
# Rough peak bytes per N * V float32 element, to skip what cannot fit instead of crashing.
MEMORY_FACTOR = {"eager": 10, "compile": 4, "matmuls": 2}
DEFAULT_MEMORY_FACTOR = 3


def device_slug(device: torch.device) -> str:
    """A folder name for the device, e.g. "nvidia-h100-80gb-hbm3" or "cpu-amd-epyc-2-cores"."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {_cpu_model()} {os.cpu_count()} cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_out_dir(device: torch.device, preset: str) -> Path:
    """bench-results/<device>/<preset>/ under the current directory. Committed results under
    benchmarks/results/ change only when ``--out`` names them, so a run never dirties a
    checkout."""
    return Path("bench-results") / device_slug(device) / preset


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _git_commit() -> str | None:
    """HEAD of the checkout (``+uncommitted`` if it has changes), or RLGAF_BENCH_COMMIT where
    the tree was copied without its .git (a lent GPU machine)."""
    if os.environ.get("RLGAF_BENCH_COMMIT"):
        return os.environ["RLGAF_BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """Device, versions, date and commit recorded with every result."""
    import rlgaf_fast

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "rlgaf_fast": rlgaf_fast.__version__,
        "backends": rlgaf_fast.available_backends(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "load_average_start": _load_average(),
    }


def ceilings(device: torch.device, preset: str) -> dict:
    """The device's measured copy bandwidth and matrix-product throughput."""
    if device.type == "cuda":
        nbytes, size, dtype = 2 << 30, 8192, torch.bfloat16
    elif preset == "tiny":
        nbytes, size, dtype = 16 << 20, 256, torch.float32
    else:
        nbytes, size, dtype = 256 << 20, 1024, torch.float32
    bandwidth = measure.copy_bandwidth(device, nbytes)
    flops = measure.matmul_flops(device, size, dtype)
    result = {
        "bytes_per_s": bandwidth,
        "bytes_method": (
            f"{'device-to-device' if device.type == 'cuda' else 'memory-to-memory'} "
            f"copy of {nbytes >> 20} MiB, counted as read + write"
        ),
        "flops_per_s": flops,
        "flops_method": f"{size}x{size}x{size} {str(dtype).removeprefix('torch.')} matmul",
    }
    if device.type == "cuda":  # float32 cases are held to a float32 product, not bfloat16's
        result["flops_float32_per_s"] = measure.matmul_flops(device, size, torch.float32)
        result["flops_float32_method"] = (
            f"{size}x{size}x{size} float32 matmul (torch's default precision)"
        )
    _free(device, collect=True)
    return result


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return 8 << 30


def _too_big(case: Case, provider: str, device: torch.device) -> str | None:
    """On a CPU, where running out of memory kills the process, skip what would not fit (a
    GPU's out-of-memory error is caught and recorded instead)."""
    if device.type != "cpu":
        return None
    factor = MEMORY_FACTOR.get(provider, DEFAULT_MEMORY_FACTOR) * (2 if case.backward else 1)
    need = factor * case.n * case.v * 4 + (case.n + case.v) * case.d * 4 * 4
    available = _available_bytes(device)
    if need > 0.8 * available:
        return f"skipped: needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    return None


def _base_row(case: Case, provider: str) -> dict:
    row = dataclasses.asdict(case)
    row.update(
        case=case.key,
        provider=provider,
        status="ok",
        error=None,
        check=None,
        max_error=None,
        check_note=None,
        median_ms=None,
        p20_ms=None,
        p80_ms=None,
        repeats=None,
        first_call_s=None,
        peak_bytes=None,
    )
    return row


def _free(device: torch.device, collect: bool = False) -> None:
    """Return cached GPU memory; with ``collect`` also run the garbage collector (about 0.4 s
    in a process holding torch and transformers, so only between cases and after errors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_provider(
    case: Case,
    problem: cases_module.Problem,
    name: str,
    provider,
    device: torch.device,
    timing: dict,
) -> dict:
    """Check, warm up, time and measure one provider on one case; errors become the row."""
    row = _base_row(case, name)
    reason = _too_big(case, name, device)
    if reason:
        row.update(status="skipped", error=reason)
        return row

    def run():
        return cases_module.step(case, problem, provider)

    try:
        problem.clear_grads()
        started = time.perf_counter()
        # compiles: neither its memory nor its outputs are the op's
        if name == "compile" or name in peer_cases.COMPILES_ON_FIRST_CALL:
            run()
            measure.synchronize(device)
            problem.clear_grads()
        # one call, its memory measured, its outputs and gradients checked; also the warm-up
        outputs, row["peak_bytes"], row["memory_method"] = measure.peak_memory(run, device)
        row["first_call_s"] = time.perf_counter() - started
        result = cases_module.check(case, problem, name, outputs)
        row.update(check=result.passed, max_error=result.max_error, check_note=result.note)
        del outputs  # back to the caching allocator, which the timed calls reuse as they would
        t = measure.time_call(run, device, setup=problem.clear_grads, **timing)
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=len(t.times_ms))
        problem.clear_grads()
    except peer_cases.Unavailable as error:
        row.update(status="unavailable", error=str(error))
    except Exception as error:  # noqa: BLE001 - any failure is recorded and the run goes on
        row.update(status="error", error=f"{type(error).__name__}: {error}"[:500])
        row["median_ms"] = row["p20_ms"] = row["p80_ms"] = row["peak_bytes"] = None
        if os.environ.get("RLGAF_BENCH_TRACEBACK"):
            traceback.print_exc()
        problem.clear_grads()
        _free(device, collect=True)
    _free(device)
    return row


def derive(rows: list[dict], ceiling: dict) -> None:
    """Speed-ups and memory ratios against eager, compile and the matmul floor, and the
    achieved throughput as a fraction of the measured ceiling."""
    by_case: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["provider"]] = row
    for row in rows:
        case = Case(
            **{k: row[k] for k in ("op", "mode", "n", "v", "d", "dtype", "variant", "goal")}
        )
        peers = by_case[row["case"]]
        for base in BASELINES:
            ref = peers.get(base)
            ok = row["median_ms"] and ref is not None and ref["median_ms"]
            row[f"speedup_vs_{base}"] = ref["median_ms"] / row["median_ms"] if ok else None
            row[f"time_ratio_vs_{base}"] = row["median_ms"] / ref["median_ms"] if ok else None
            mem_ok = row["peak_bytes"] is not None and ref is not None and ref["peak_bytes"]
            row[f"mem_ratio_vs_{base}"] = row["peak_bytes"] / ref["peak_bytes"] if mem_ok else None
        # The roofline: the least time the bytes and the FLOPs each take at the ceiling; the
        # larger is the bound, and the fraction of ceiling is that time over the measured one.
        amounts = cases_module.work(case)
        floors = {
            kind: amount / _ceiling_for(ceiling, kind, case.dtype)
            for kind, amount in amounts.items()
            if amount
        }
        bound = max(floors, key=floors.get)
        row["bound"] = bound
        if row["median_ms"]:
            seconds = row["median_ms"] * 1e-3
            row["achieved_per_s"] = amounts[bound] / seconds
            row["fraction_of_ceiling"] = floors[bound] / seconds
        else:
            row["achieved_per_s"] = row["fraction_of_ceiling"] = None
    peer_cases.derive(rows)


def _ceiling_for(ceiling: dict, kind: str, dtype: str) -> float:
    """The ceiling of ``kind`` (bytes or flops) for a case in ``dtype``: the matmul throughput
    measured in that dtype where there is one (GPUs: bfloat16 and float32)."""
    return ceiling.get(f"{kind}_{dtype}_per_s", ceiling[f"{kind}_per_s"])


def evaluate_goals(goals: list[Goal], rows: list[dict]) -> list[dict]:
    """Each goal against the rows it names: value, met or not, or why it could not be judged."""
    verdicts = []
    for goal in goals:
        matching = [
            r
            for r in rows
            if r["case"] == goal.case_key
            and (
                r["provider"] == goal.provider
                or (goal.provider == FUSED and r["provider"] not in (*BASELINES, *PEERS))
            )
        ]
        if not matching:
            verdicts.append(
                {
                    **dataclasses.asdict(goal),
                    "provider_row": goal.provider,
                    "value": None,
                    "met": None,
                    "note": "provider not in this run",
                }
            )
        for row in matching:
            value = row.get(goal.metric)
            verdicts.append(
                {
                    **dataclasses.asdict(goal),
                    "provider_row": row["provider"],
                    "value": value,
                    "met": None if value is None else goal.met(value),
                    "note": row["error"]
                    or ("" if row["check"] in (True, None) else "output failed its check"),
                }
            )
    return verdicts


def run_suite(
    preset: str = "quick",
    ops: list[str] | None = None,
    out_dir: str | None = None,
    device: str | None = None,
    plots: bool = True,
    max_plots: int | None = None,
    progress: bool = True,
    time_limit_s: float | None = None,
    compile_baseline: bool = True,
    shape: tuple[int, int, int] | None = None,
    dtype: str | None = None,
    note: str | None = None,
) -> dict:
    """Run a preset (tiny, quick, full, goals, peers) and write JSON, Markdown and PNG plots;
    ``shape`` (N, H, V) and ``dtype`` set the peers preset's size; ``note`` is recorded with
    the results (e.g. what else ran on the machine).

    The providers of a case run one after the other, so that their ratios compare runs made
    close in time (on a shared machine the load drifts). With ``time_limit_s`` the fused and
    eager providers of every case run first and the torch.compile baselines (whose compilation
    can take minutes) after them, so that the limit (or a kill) loses the baselines first; past
    the limit the remaining runs become "skipped" rows.
    Returns the results document (also written as ``results.json`` under ``out_dir``).
    """
    import rlgaf_fast

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    selected, goals = select(preset, dev.type, ops, shape, dtype)
    out = Path(out_dir) if out_dir else default_out_dir(dev, preset)
    out.mkdir(parents=True, exist_ok=True)
    fused = [
        b
        for b in rlgaf_fast.available_backends()
        if b != "torch" and (b == "cpp") == (dev.type == "cpu")
    ]
    started = time.perf_counter()
    doc = {
        "preset": preset,
        "environment": environment(dev),
        "ceilings": ceilings(dev, preset),
        "memory_method": measure.memory_method(dev),
        "rows": [],
        "goals": [],
    }
    if note:
        doc["note"] = note
    order = {case.key: i for i, case in enumerate(selected)}
    jobs = [
        (case, name)
        for case in selected
        for name in cases_module.providers(case, fused)
        if compile_baseline or name != "compile"
    ]
    if time_limit_s is not None:  # stable sort: every compile baseline after all the rest
        jobs.sort(key=lambda job: job[1] == "compile")
    bar = _progress(len(jobs), progress)
    problem, problem_case = None, None

    def save() -> None:
        doc["rows"].sort(key=lambda r: order[r["case"]])
        derive(doc["rows"], doc["ceilings"])
        doc["goals"] = evaluate_goals(goals, doc["rows"])
        doc["elapsed_s"] = time.perf_counter() - started
        report.write_json(doc, out / "results.json")
        report.write_markdown(doc, out / "results.md")

    for case, name in jobs:
        bar.set_description(f"{case.op} {case.mode} N={case.n} V={case.v} {name}"[:60])
        row = _base_row(case, name)
        if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
            row.update(status="skipped", error=f"skipped: past the time limit of {time_limit_s} s")
        else:
            if problem_case != case:
                problem, problem_case = None, None
                _free(dev, collect=True)
                try:
                    problem, problem_case = cases_module.make_problem(case, dev), case
                except Exception as error:  # noqa: BLE001 - e.g. out of memory for the inputs
                    row.update(
                        status="error", error=f"inputs: {type(error).__name__}: {error}"[:500]
                    )
            if problem is not None:
                provider = cases_module.providers(case, fused)[name]
                row = run_provider(case, problem, name, provider, dev, TIMING[preset])
        doc["rows"].append(row)
        bar.update(1)
        save()
    problem = None
    _free(dev)
    bar.close()
    doc["environment"]["load_average_end"] = _load_average()
    save()
    if plots:
        doc["plots"] = report.write_plots(doc, out, max_plots=max_plots)
        report.write_json(doc, out / "results.json")
    return doc


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:

        class _Quiet:
            def update(self, n=1): ...
            def set_description(self, text): ...
            def close(self): ...

        return _Quiet()
    return tqdm(total=total, unit="run", dynamic_ncols=True)
