"""core/memory.py: malloc keeps freed memory for the inference stages, so a per-image tensor reuses pages."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from stages.core import memory

PAGE_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from stages.core import memory
    applied = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    per_block = []
    for _ in range(20):  # 96 MB allocated, touched and freed, as an image's tensors are
        before = faults()
        torch.ones(24 << 20)
        per_block.append(faults() - before)
    print(applied, memory.kept_bytes(), *per_block)
""")


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages: a fresh block takes few faults anyway")
def test_kept_memory_spares_the_page_faults_of_a_fresh_block():
    """A 96 MB block allocated and freed 20 times: by default each time fresh pages (24,576 of 4 KiB); once malloc
    keeps freed memory, none after the first blocks (here the steady state came after 1 to 9 of them). In a child
    process: the setting lasts for the process."""
    def run(mode: str) -> tuple[str, int, list[int]]:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        applied, kept, *faults = out.stdout.split()
        return applied, int(kept), [int(f) for f in faults]

    applied, kept, default_faults = run("default")
    assert (applied, kept) == ("False", 0)
    if min(default_faults) <= 10_000:  # e.g. multi-size huge pages, or malloc tuned from the environment
        pytest.skip(f"fresh blocks take few page faults here even by default ({min(default_faults)}): nothing to show")
    applied, kept, kept_faults = run("keep")
    if applied != "True":
        pytest.skip("this C library has no mallopt")
    assert kept == memory.KEPT_BYTES
    assert kept_faults[-1] < 1000 and sum(f < 1000 for f in kept_faults) >= 5, kept_faults


def test_kept_bytes_is_zero_until_set_and_the_environment_can_say_no(monkeypatch):
    monkeypatch.setattr(memory, "_kept", [])
    assert memory.kept_bytes() == 0
    monkeypatch.setenv(memory.ENV_SWITCH, "0")
    assert memory.keep_freed_memory() is False and memory.kept_bytes() == 0
    monkeypatch.delenv(memory.ENV_SWITCH)
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.keep_freed_memory() is False and memory.kept_bytes() == 0
