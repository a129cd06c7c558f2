"""The trainer's CPU step under each memory allocator: glibc as it comes, glibc keeping freed memory (the trainer's
CPU default, ``ssl_patch_analysis.allocator``) and jemalloc preloaded, with and without giving memory back.

Each column is ``python -m ssl_patch_analysis.train`` in a process of its own, as a user runs it: EMP-SSL's step
(100 images x 20 patches of 16x16 resized to 32), 2 epochs of 2 steps, the second epoch's rate from its log. The
process's user and system CPU time, minor page faults and peak resident memory come from ``wait4``. Prints one
table.

    python benchmarks/allocator.py                        # 21-23 min on 2 AVX2 cores without bf16 units
    python benchmarks/allocator.py --jemalloc /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ssl_patch_analysis.allocator import MALLOC_ENV
from ssl_patch_analysis.extract import cpu_has_bf16
from ssl_patch_analysis.train import read_log

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"   # Debian's libjemalloc2
NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"          # jemalloc keeps freed pages instead of purging them


def settings(jemalloc: str | None) -> list[tuple[str, dict[str, str]]]:
    rows = [("glibc, as it comes", {MALLOC_ENV: "default"}),
            ("glibc, freed memory kept (trainer default)", {})]
    if jemalloc:
        rows += [("jemalloc, as it comes", {"LD_PRELOAD": jemalloc}),
                 (f"jemalloc, MALLOC_CONF={NO_DECAY}", {"LD_PRELOAD": jemalloc, "MALLOC_CONF": NO_DECAY})]
    return rows


def run(env: dict[str, str], args: argparse.Namespace) -> dict:
    """One trainer process: its second epoch's patches/s and what wait4 says of the process."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "ssl_patch_analysis.train", "--method", "emp-ssl", "--epochs", "2",
                   "--train-size", str(2 * args.batch), "--batch-size", str(args.batch), "--knn-every", "0",
                   "--knn-train-size", "100", "--knn-test-size", "100",
                   "--device", "cpu", "--run-dir", f"{out}/run"]
        if args.data_root:
            command += ["--data-root", args.data_root]
        started = time.perf_counter()
        with open(f"{out}/stderr", "w+") as errors:   # its progress bars, and what went wrong if it did
            inherited = {k: v for k, v in os.environ.items() if k not in (MALLOC_ENV, "LD_PRELOAD", "MALLOC_CONF")}
            child = subprocess.Popen(command, env={**inherited, **env}, stdout=subprocess.DEVNULL, stderr=errors)
            _, status, usage = os.wait4(child.pid, 0)   # this process's own usage, peak memory included
            wall = time.perf_counter() - started
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode:
                errors.seek(0)
                raise SystemExit(f"error: the trainer exited with status {child.returncode}: {' '.join(command)}\n"
                                 + errors.read()[-2000:])
        records = read_log(Path(out) / "run" / "log.jsonl")
        header, second = records[0], records[2]
    return {"patches_per_s": second["images_per_s"] * header["args"]["num_patches"], "malloc": header["malloc"],
            "amp": header["args"]["amp"], "wall_s": wall,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "max_rss_gib": usage.ru_maxrss / 2**20}   # ru_maxrss in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=100, help="images per step (x 20 patches)")
    parser.add_argument("--jemalloc", default=JEMALLOC if Path(JEMALLOC).is_file() else None,
                        help=f"libjemalloc.so to preload (default {JEMALLOC} when it is there; Debian: libjemalloc2)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.jemalloc and not Path(args.jemalloc).is_file():
        raise SystemExit(f"error: --jemalloc {args.jemalloc} is not a file (Debian: apt install libjemalloc2)")
    if not args.jemalloc:
        print(f"note: no jemalloc at {JEMALLOC} (Debian: apt install libjemalloc2): its rows are left out")
    bf16 = "bf16 units" if cpu_has_bf16() else "no bf16 units"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {bf16}; emp-ssl step of "
          f"{args.batch} images x 20 patches, the trainer's second epoch (2 steps)")
    rows = []
    for name, env in settings(args.jemalloc):
        row = {"setting": name, **run(env, args)}
        rows.append(row)
        print(f"  {name}: {row['patches_per_s']:.1f} patches/s ({row['malloc']})", flush=True)
    base = rows[0]["patches_per_s"]
    print("\n| allocator | precision | patches/s | vs glibc as it comes | user CPU s | system CPU s "
          "| minor page faults | peak RSS (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        precision = "bf16 autocast" if row["amp"] else "float32"
        print(f"| {row['setting']} | {precision} | {row['patches_per_s']:.1f} | {row['patches_per_s'] / base:.2f}x "
              f"| {row['user_s']:.0f} | {row['sys_s']:.0f} | {row['minor_faults'] / 1e6:.1f} M "
              f"| {row['max_rss_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
