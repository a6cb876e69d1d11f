"""The README's example, run as a user would on a CPU-only machine (issue 13): ``"cuda"`` replaced by ``"cpu"`` and
T = 512, forward + backward, in a fresh process. Its peak memory must stay well inside a laptop's (the CPU path used
to keep an fp32 [T, H] tensor per expert: 10.3 GB and 23 s at T = 512 on the 2-core CI machine; 0.58 GB and 1.6 s
after issue 13, the process's start and imports included)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
PEAK_RSS_LIMIT_MB = 1536
WALL_LIMIT_S = 10


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "moe_raw.permute(" in b and "backward()" in b)
    return example


def test_readme_example_on_cpu_fits_a_laptop():
    code = _example().replace('"cuda"', '"cpu"')
    code, n = re.subn(r"^T, H, E, K = \d+,", "T, H, E, K = 512,", code, flags=re.M)
    assert n == 1, "the README example no longer sets T, H, E, K on one line"
    probe = (
        "import resource, time\nt0 = time.perf_counter()\n"
        + code
        + "\nassert x.grad.shape == x.shape and logits.grad.shape == logits.shape\n"
        "print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seconds, peak_mb = map(float, result.stdout.split()[-2:])
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
    assert seconds < WALL_LIMIT_S, f"{seconds:.1f} s"
