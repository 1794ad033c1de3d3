"""predict_images streams a clip: its peak memory beyond the results does not grow with the frame count.

Measured as resident memory in fresh processes (torch's CPU allocations are invisible to
tracemalloc): the peak (VmHWM, reset through /proc/self/clear_refs after a warm-up run) minus the
resident memory before the call, minus the results (raw values and visuals). Resident memory counts
only this process's pages, so other work on a shared machine does not disturb it. The networks are
the stand-in backend's (tests/support/standins.py), so only what predict_images itself holds is measured;
benchmarks/bench_video.py measures the same with the tiny SD model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, SUPPORT

SCRIPT = r"""
import sys
import torch
sys.path[:0] = [{root!r}, {tests!r}]
from standins import PIXEL_DEPTH, PIXEL_OPTIONS, PixelBackend
from dmp_model import images as imageproc
from dmp_model.prediction import predict as prediction

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

frames, leak = int(sys.argv[1]), sys.argv[2] == "leak"
if leak:  # a deliberate copy of the whole input, to show that the measure sees one
    prediction.to_image_batch = lambda images: imageproc.to_image_batch(images).clone()
backend, adapters = PixelBackend(), {{"depth": PIXEL_DEPTH}}
options = PIXEL_OPTIONS.updated(batch_size=4, visual_range="batch")
generator = torch.Generator().manual_seed(0)
prediction.predict_images(backend, torch.rand(8, 3, 64, 64, generator=generator), adapters, options)  # warm up
images = torch.rand(frames, 3, 64, 64, generator=generator)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak
before = kib("VmRSS")
result = prediction.predict_images(backend, images, adapters, options)["depth"]
peak = kib("VmHWM")
assert backend.encoded == frames + 8
print(peak - before - result.raw.nbytes - result.visual.nbytes)
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak(),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak resident memory")
def test_peak_memory_beyond_the_results_does_not_grow_with_the_frame_count():
    script = SCRIPT.format(root=str(ROOT), tests=str(SUPPORT))
    runs = {(frames, mode): subprocess.Popen([sys.executable, "-c", script, str(frames), mode],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for frames, mode in ((16, "plain"), (256, "plain"), (256, "leak"))}
    excess = {}
    for key, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        excess[key] = int(out.split()[-1]) / 2**20  # MiB beyond the results
    input_mib = 256 * 3 * 64 * 64 * 4 / 2**20  # 12 MiB: what one whole-clip copy costs
    # 240 more frames cost no more than a few MiB of allocator slack beyond their results...
    assert excess[256, "plain"] - excess[16, "plain"] < 0.25 * input_mib, excess
    # ...while a single whole-clip copy shows up in full: the measure can see growth.
    assert excess[256, "leak"] - excess[256, "plain"] > 0.75 * input_mib, excess
