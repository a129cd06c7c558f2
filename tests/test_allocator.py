"""keep_freed_memory: a freed large buffer is reused without page faults (glibc gives it back to the kernel by
default, so the next step's buffer faults in again, page by page). Each case runs in its own process: the setting
is process-wide."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from ssl_patch_analysis.allocator import MALLOC_ENV, preloaded_allocator
from test_train import TINY

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or preloaded_allocator() is not None,
                                reason="glibc's malloc settings: this C library is not glibc, or another is preloaded")

BUFFER_MB = 64
PAGES = BUFFER_MB * 2**20 // 4096

CYCLES = 24
# A 64 MiB tensor written and freed, again and again, as a training step's activations: the page faults of each
# cycle. Kept memory is reused once the heap has room for the buffer beside what Python allocated in between (a
# few cycles, at most 9 in 10 tries here: the heap grows by the buffer's size until then).
SCRIPT = f"""
import json, resource, sys, torch
from ssl_patch_analysis.allocator import keep_freed_memory, malloc_description
done = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults_of_a_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty({BUFFER_MB} * 2**20 // 4, dtype=torch.float32)
    x.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del x
    return faults
faults = [faults_of_a_buffer() for _ in range({CYCLES})]
print(json.dumps({{"done": done, "faults": faults, "said": malloc_description()}}))
"""


def inherited(**env: str) -> dict[str, str]:
    """This process's environment without a setting of the variable, plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if k != MALLOC_ENV}, **env}


def run(mode: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                            env=inherited(**env))
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_freed_buffer_is_reused_without_faulting_its_pages_in_again():
    default = run("default")
    kept = run("keep")
    # the control: glibc unmaps each freed 64 MiB, so every buffer faults in again (at least one fault per 2 MiB
    # page, one per 4 KiB page without transparent huge pages)
    assert all(f >= BUFFER_MB // 2 for f in default["faults"])
    assert default["said"] == "glibc malloc, unchanged"
    # kept: the first buffer faults in as before; the last third of the cycles reuse its pages
    assert kept["faults"][0] >= BUFFER_MB // 2
    late = kept["faults"][2 * CYCLES // 3:]
    assert sum(late) < PAGES // 100
    assert sum(late) * 10 < sum(default["faults"][2 * CYCLES // 3:])
    assert kept["done"] == kept["said"] and "freed memory kept" in kept["said"]


@glibc_only
def test_the_environment_variable_turns_it_off():
    off = run("keep", **{MALLOC_ENV: "default"})
    assert off["done"] == f"glibc malloc, unchanged ({MALLOC_ENV}=default)"
    assert all(f >= BUFFER_MB // 2 for f in off["faults"])   # as glibc's default: the pages fault in again


@glibc_only
@pytest.mark.parametrize("setting", ["kept", "default"])
def test_the_trainer_keeps_freed_memory_on_a_cpu_and_its_log_says_so(cifar10_npz, tmp_path, setting):
    env = inherited(**({MALLOC_ENV: "default"} if setting == "default" else {}))
    command = [sys.executable, "-m", "ssl_patch_analysis.train", "--data-root", str(cifar10_npz.parent),
               "--run-dir", str(tmp_path), *TINY, "--knn-every", "0", "--epochs", "1"]   # TINY: --device cpu
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    header = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    said = [line for line in result.stdout.splitlines() if line.startswith("malloc: ")]
    if setting == "kept":
        assert header["malloc"] == "glibc malloc, freed memory kept (no mmap for large blocks, trim threshold 2 GiB)"
        assert said == [f"malloc: {header['malloc']} (a faster CPU step, a higher peak of memory; "
                        f"{MALLOC_ENV}=default for glibc's own)"]
    else:
        assert header["malloc"] == f"glibc malloc, unchanged ({MALLOC_ENV}=default)"
        assert said == [f"malloc: {header['malloc']}"]
