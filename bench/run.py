"""alignkit against TRL on the same workloads: `make bench` (bench/README.md).

For each repetition and each workload, alignkit then TRL run (A B A B ...), each in a fresh process
(`bench/sides.py`), so machine drift hits both sides alike and peak memory is per run. The machine's
matmul peak (a large fp32 matmul, same thread count) is measured in the same invocation, before and after
the runs, and MFU is useful FLOPs per second over that peak. Results: bench/results/bench-<date>.json,
.md (the table printed at the end) and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import DEFAULT, workloads  # noqa: E402

TARGET_SPEED = {"sft": 1.2, "rm": 1.2, "dpo": 1.5, "dpo-lora": 1.5, "grpo": 1.5}
TARGET_MEMORY = 0.7


def matmul_peak_gflops(threads: int, n: int = 4096, repeats: int = 5) -> float:
    """Best of `repeats` timings of an n×n fp32 matmul, in GFLOP/s (2n³ per product), in a fresh process."""
    code = (
        "import torch,time,sys\n"
        f"torch.set_num_threads({threads})\n"
        f"a=torch.randn({n},{n});b=torch.randn({n},{n});a@b\n"
        "best=1e9\n"
        f"for _ in range({repeats}):\n"
        "    t=time.perf_counter();a@b;best=min(best,time.perf_counter()-t)\n"
        f"print(2*{n}**3/best/1e9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run_one(workload: str, side: str, rep: int, steps: int, threads: int, scratch: Path, timeout: int) -> dict | None:
    out = scratch / f"{workload}-{side}-{rep}.json"
    cmd = [sys.executable, str(HERE / "sides.py"), workload, side, "--out", str(out), "--threads", str(threads)]
    if steps:
        cmd += ["--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {workload}/{side} rep {rep} FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return None
    result = json.loads(out.read_text())
    print(
        f"  {workload:9s} {side:8s} rep {rep}: {result['tokens_per_s']:7.1f} tok/s, peak {result['peak_rss_mb']:6.0f} MiB, "
        f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return result


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(runs: list[dict], peak: float) -> dict:
    """Medians per workload and side, the alignkit/TRL ratios, MFU and the loss check."""
    table = {}
    for name in dict.fromkeys(r["workload"] for r in runs):
        row: dict = {"workload": name}
        for side in ("alignkit", "trl"):
            mine = [r for r in runs if r["workload"] == name and r["side"] == side]
            if not mine:
                continue
            flops_per_s = median([r["flops"] / r["timed_s"] for r in mine])
            row[side] = {
                "reps": len(mine),
                "tokens_per_s": median([r["tokens_per_s"] for r in mine]),
                "tokens_per_s_all": [round(r["tokens_per_s"], 2) for r in mine],
                "samples_per_s": median([r["samples_per_s"] for r in mine]),
                "peak_rss_mb": median([r["peak_rss_mb"] for r in mine]),
                "mfu": flops_per_s / (peak * 1e9),
                "loss_first": median([r["losses"][0] for r in mine]),
                "loss_last": median([r["losses"][-1] for r in mine]),
                "losses": mine[0]["losses"],
                "generation_tokens_per_s": median([r["generation_tokens"] / r["generation_s"] for r in mine if r["generation_s"]]),
                "reference_s": median([r["reference_s"] for r in mine]),
                "mean_reward": median([sum(r["rewards"]) / len(r["rewards"]) for r in mine if r["rewards"]]),
            }
        if "alignkit" in row and "trl" in row:
            a, t = row["alignkit"], row["trl"]
            row["speed_ratio"] = a["tokens_per_s"] / t["tokens_per_s"]
            # The ratio within each repetition (A and B ran back to back) cancels slow drift of the machine better.
            paired = [
                ra["tokens_per_s"] / rt["tokens_per_s"]
                for ra in runs for rt in runs
                if ra["workload"] == rt["workload"] == name and ra["side"] == "alignkit" and rt["side"] == "trl" and ra["rep"] == rt["rep"]
            ]
            row["speed_ratio_paired"] = median(paired)
            row["speed_ratios_per_rep"] = [round(x, 3) for x in paired]
            row["memory_ratio"] = a["peak_rss_mb"] / t["peak_rss_mb"]
            row["speed_target"] = TARGET_SPEED.get(name, 1.2)
            # Within noise: the same data and weights give the same first loss to float rounding; the last one
            # may drift a little (summation order), and for GRPO the samples differ, so 5% is allowed there.
            tol_last = 0.05 if name == "grpo" else 0.02
            row["loss_equal"] = bool(
                abs(a["loss_first"] - t["loss_first"]) <= 1e-3 + 1e-3 * abs(t["loss_first"])
                and abs(a["loss_last"] - t["loss_last"]) <= max(tol_last * abs(t["loss_last"]), 5e-3)
            )
        table[name] = row
    return table


def markdown(table: dict, meta: dict) -> str:
    lines = [
        f"# alignkit vs TRL — {meta['date']}",
        "",
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, TRL {meta['trl']}; "
        f"{meta['threads']} threads; fp32 matmul peak {meta['peak_gflops']:.1f} GFLOP/s "
        f"(before {meta['peak_before']:.1f}, after {meta['peak_after']:.1f}); medians of {meta['reps']} interleaved "
        "repetitions per side; one warm-up step excluded from timing.",
        "",
        "| workload | tok/s alignkit | tok/s TRL | ratio (target) | paired ratio | samples/s A / T | peak MiB alignkit | peak MiB TRL | mem ratio (≤0.7) | MFU A / T | loss step 1 A / T | loss last A / T | equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        a, t = row.get("alignkit"), row.get("trl")
        if not (a and t):
            continue
        ok_speed = "✓" if row["speed_ratio"] >= row["speed_target"] else "✗"
        ok_mem = "✓" if row["memory_ratio"] <= TARGET_MEMORY else "✗"
        lines.append(
            f"| {name} | {a['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | {row['speed_ratio']:.2f}× {ok_speed} (≥{row['speed_target']}) "
            f"| {row['speed_ratio_paired']:.2f}× ({', '.join(f'{x:.2f}' for x in row['speed_ratios_per_rep'])}) "
            f"| {a['samples_per_s']:.3f} / {t['samples_per_s']:.3f} | {a['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} "
            f"| {row['memory_ratio']:.2f}× {ok_mem} | {100 * a['mfu']:.1f}% / {100 * t['mfu']:.1f}% "
            f"| {a['loss_first']:.4f} / {t['loss_first']:.4f} | {a['loss_last']:.4f} / {t['loss_last']:.4f} "
            f"| {'yes' if row['loss_equal'] else 'NO'} |"
        )
    extra = []
    for name, row in table.items():
        a, t = row.get("alignkit"), row.get("trl")
        if a and t and a["generation_tokens_per_s"] == a["generation_tokens_per_s"]:
            extra.append(
                f"- {name}: generation {a['generation_tokens_per_s']:.1f} vs {t['generation_tokens_per_s']:.1f} completion tokens/s "
                f"(alignkit / TRL); mean reward {a['mean_reward']:.3f} / {t['mean_reward']:.3f}"
            )
        if a and a["reference_s"]:
            extra.append(f"- {name}: alignkit's one reference pass over the data took {a['reference_s']:.1f} s; its share of the timed steps is included")
    if extra:
        lines += ["", *extra]
    lines += ["", "ratio: median alignkit tok/s over median TRL tok/s; paired ratio: median of the per-repetition ratios (in brackets). "
              "tok/s: real (non-padding) tokens trained per second, counted identically on both sides (bench/README.md). "
              "MFU: (6·N·trained tokens, 4·N with LoRA, + 2·N·forward-only tokens) / time / matmul peak, N = model parameters."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in table.items() if "alignkit" in r and "trl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(names))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens / s (higher is better)"), (axes[1], "peak_rss_mb", "peak RSS, MiB (lower is better)")):
        ax.bar([i - 0.2 for i in x], [table[n]["alignkit"][key] for n in names], 0.4, label="alignkit")
        ax.bar([i + 0.2 for i in x], [table[n]["trl"][key] for n in names], 0.4, label="TRL")
        ax.set_xticks(list(x), names)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(DEFAULT), help=f"comma-separated, of {', '.join(workloads())}")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per side (interleaved)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (0: each workload's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--report", default="", help="re-render the table and plot of a results JSON file, run nothing")
    args = parser.parse_args()
    if args.report:
        return rerender(Path(args.report))
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = set(names) - set(workloads())
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {sorted(workloads())}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / ".runs"
    scratch.mkdir(exist_ok=True)
    peak_before = matmul_peak_gflops(args.threads)
    print(f"fp32 matmul peak: {peak_before:.1f} GFLOP/s ({args.threads} threads)", flush=True)
    runs: list[dict] = []
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    for rep in range(args.reps):
        for name in names:
            for side in ("alignkit", "trl"):
                result = run_one(name, side, rep, args.steps, args.threads, scratch, args.timeout)
                if result is not None:
                    result["rep"] = rep
                    runs.append(result)
        # Results so far are written after every repetition, so an interrupted run still leaves a table.
        write(out_dir, stamp, runs, args, names, peak_before, matmul_peak_gflops(args.threads), final=rep == args.reps - 1)
    for f in scratch.glob("*.json"):
        f.unlink()


def write(out_dir: Path, stamp: str, runs: list[dict], args, names: list[str], peak_before: float, peak_after: float, final: bool) -> None:
    import torch
    import transformers
    import trl

    peak = max(peak_before, peak_after)
    table = summarise(runs, peak)
    meta = {
        "date": stamp,
        "machine": f"{os.cpu_count()} CPU cores, {os.uname().machine}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads": args.threads,
        "reps": max((r["rep"] + 1 for r in runs), default=0),
        "peak_gflops": peak,
        "peak_before": peak_before,
        "peak_after": peak_after,
        "load_average": os.getloadavg(),
        "workloads": {n: workloads(args.steps or None)[n].to_json() for n in names},
    }
    text = markdown(table, meta)
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps({"meta": meta, "summary": table, "runs": runs}, indent=1))
    (out_dir / f"bench-{stamp}.md").write_text(text)
    plot(table, out_dir / f"bench-{stamp}.png")
    if final:
        print()
        print(text)
        print(f"written: {out_dir}/bench-{stamp}.{{json,md,png}}")
    else:
        print(f"  (results so far written to {out_dir}/bench-{stamp}.md)", flush=True)


def rerender(path: Path) -> None:
    data = json.loads(path.read_text())
    table = summarise(data["runs"], data["meta"]["peak_gflops"])
    text = markdown(table, data["meta"])
    path.write_text(json.dumps({**data, "summary": table}, indent=1))
    path.with_suffix(".md").write_text(text)
    plot(table, path.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
