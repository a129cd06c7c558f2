"""benchmarks/emp_ssl_cpu.sh: the candidate's bf16 cards are refused on a CPU without bf16 units (emulated, ~16 h)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "emp_ssl_cpu.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None,
                                reason="the script needs bash, and git for the committed cards it pairs with")


def _candidate(tmp_path, **env) -> subprocess.CompletedProcess:
    """STEPS=candidate of a run folder that does not exist, with the cards it would pair with in an empty folder."""
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "STEPS": "candidate", "EPOCHS": "999", "RESULTS": str(tmp_path), **env})


@pytest.mark.parametrize("slow", ["0", "1"])
def test_candidate_is_refused_on_a_cpu_without_bf16_units_unless_asked_for(tmp_path, slow):
    result = _candidate(tmp_path, CPU_HAS_BF16="0", SLOW_BF16=slow)
    assert result.returncode != 0
    if slow == "0":
        assert "this CPU has no bf16 units" in result.stderr and "SLOW_BF16=1" in result.stderr
        assert result.stderr.count("\n") == 1  # one line, before anything else
    else:  # past the check: on to the committed cards it pairs with (none in an empty folder)
        assert "no bf16 units" not in result.stderr and "is not as the last commit holds it" in result.stderr
    assert not (ROOT / "runs" / "emp-ssl-cpu-10k-999ep").exists()


def test_candidate_goes_on_with_bf16_units(tmp_path):
    result = _candidate(tmp_path, CPU_HAS_BF16="1")
    assert "no bf16 units" not in result.stderr and "is not as the last commit holds it" in result.stderr
