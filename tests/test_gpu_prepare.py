"""benchmarks/gpu_prepare.sh, run in a clone of this repository: what travels to a lent GPU machine (the working tree
and the carried .gpu_data) fits the device tool's 64 MiB with room for a session's own new files, and `restore` puts
the index back as it was. A committed figure or model that pushes the total over the limit fails here, not in a
device session whose minutes are counted."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADROOM_MIB = 4  # what one session may add (new figures, results) before its device call


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_what_travels_to_the_device_fits_and_restore_undoes_it(tmp_path, cifar10_npz):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs this project as a git checkout (the script works on its index)")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "PYTHON": sys.executable, "SSL_PATCH_ANALYSIS_DATA": str(cifar10_npz.parent)}
    run = subprocess.run(["bash", "benchmarks/gpu_prepare.sh"], cwd=clone, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    total = re.search(r"= (\d+) MiB \(limit 64\)", run.stdout)
    assert total, run.stdout
    assert int(total.group(1)) <= 64 - HEADROOM_MIB, run.stdout
    assert _git("ls-files", "pretrained/*.pt", "figures", cwd=clone) == ""  # neither travels
    assert (clone / "pretrained" / "vicreg-resnet18-cifar10.pt").is_file()  # the files themselves stay

    restore = subprocess.run(["bash", "benchmarks/gpu_prepare.sh", "restore"], cwd=clone, env=env,
                             capture_output=True, text=True)
    assert restore.returncode == 0, restore.stderr
    assert _git("status", "--porcelain", cwd=clone) == ""  # the index is HEAD's again; .gpu_data stays ignored
    exclude = (clone / ".git" / "info" / "exclude").read_text()
    assert "/figures/" not in exclude.splitlines() and "/pretrained/*.pt" not in exclude.splitlines()
