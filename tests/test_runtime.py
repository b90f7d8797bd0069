"""Process set-up: glibc's malloc keeps the memory a step frees on the CPU backend."""

import subprocess
import sys
import textwrap

import pytest

# Allocates, touches and frees 64 MiB twice with the C library's malloc; prints the page faults
# that the second allocation took to touch its pages.
_FAULTS_OF_A_REUSED_BLOCK = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys
    from itune.runtime import keep_freed_host_memory
    if sys.argv[1] == "keep":
        assert keep_freed_host_memory()
    elif sys.argv[1] == "keep-then-restore":
        assert keep_freed_host_memory() and keep_freed_host_memory(False)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def touched_block():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        return block
    libc.free(touched_block())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    libc.free(touched_block())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_A_REUSED_BLOCK, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_kept_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    default, kept, restored = _faults("default"), _faults("keep"), _faults("keep-then-restore")
    # By default the block is a fresh mmap each time: every page faults in again.
    assert default >= pages // 2, default
    assert kept < pages // 50, kept
    assert restored >= pages // 2, restored
