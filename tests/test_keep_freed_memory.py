"""memory.keep_freed_memory, which training applies on CPU: once applied, the passes of a
small training loop after the first reuse the pages freed by the last (few page faults),
where glibc's default maps and faults in its large tensors again at every pass; the
user's own MALLOC_* setting, and CAFFE_COMPAT_KEEP_FREED_MEMORY=0, leave the allocator
alone. Each case runs in its own process (the setting is the process's)."""
import os
import platform

import pytest

from conftest import run_python

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator")

# Page faults of passes 5 to 10 of forward and backward through two convolutions whose tops are
# past glibc's largest mmap threshold (32 MiB), which its default maps afresh at every pass.
LOOP_FAULTS = """
import resource
import torch
from caffe_compat.memory import keep_freed_memory
applied = keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
x = torch.randn(17, 3, 128, 128)  # 35.7 MB tops
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[4:]))
"""


def _run(**environment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("CAFFE_COMPAT_KEEP_FREED_MEMORY", None)
    env.update(environment, OMP_NUM_THREADS="1")
    result = run_python(LOOP_FAULTS, env=env)
    assert result.returncode == 0, result.stderr
    applied, faults = result.stdout.split()
    return applied == "True", int(faults)


def test_kept_memory_is_reused_across_passes():
    kept, kept_faults = _run()
    left, left_faults = _run(CAFFE_COMPAT_KEEP_FREED_MEMORY="0")
    assert kept and not left
    assert left_faults > 6 * 8704  # at least one top's pages (35.7 MB) per pass
    assert kept_faults * 4 < left_faults


def test_the_users_own_malloc_setting_is_left_alone():
    applied, _ = _run(MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied
