"""Host allocator tuning (:mod:`ugi_bids.engine.allocator`)."""

from __future__ import annotations

import ctypes
import resource
import sys

import pytest

from ugi_bids.engine.allocator import release_freed_memory, retain_freed_memory

BLOCK_BYTES = 64 << 20


def _faults_of_fresh_block(libc) -> int:
    """Minor page faults taken while malloc-ing and writing a 64 MiB block (then freed)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(BLOCK_BYTES)
    ctypes.memset(block, 1, BLOCK_BYTES)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults


def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            return mode.read()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_freed_large_blocks_are_reused_without_page_faults():
    """glibc serves a 64 MiB block with its own mmap and unmaps it on free, so every fresh
    block costs a page fault per 4 KiB page (16,384). After retain_freed_memory() the block
    comes from the heap and a second one reuses its pages."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    pages = BLOCK_BYTES / 4096
    assert retain_freed_memory()
    assert retain_freed_memory()  # idempotent
    try:
        _faults_of_fresh_block(libc)  # the heap grows once
        assert _faults_of_fresh_block(libc) < 0.05 * pages
    finally:
        release_freed_memory()
    # glibc's defaults again (what instance optimisation runs under): a fresh mmap, faulted in
    # page by page (unless the kernel backs every mapping with huge pages).
    if "[always]" not in _transparent_huge_pages():
        assert _faults_of_fresh_block(libc) > 0.5 * pages
