"""``iotrace probe-info`` and the resolver on files that are not device models (issue #12 item 6):
only regular ELF files are read, by sections through mmap; anything else is one clear line, a
non-zero exit, bounded memory and no blocking. Each case runs the real CLI in a subprocess with an
address-space limit and a timeout, so a read without bounds fails the test instead of the host."""
from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import sys

import pytest

from iotrace.probes.hook.elf import ElfError, ElfFile

LIMIT_AS = 1 << 30           # 1 GiB of address space: far below what reading /dev/zero took
TIMEOUT = 60


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def probe_info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iotrace", "probe-info", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_limit,
                          stdin=subprocess.DEVNULL)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_dev_zero():
    r = probe_info("/dev/zero")
    one_line_error(r, "/dev/zero", "is a character device, not an ELF binary")


def test_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = probe_info(str(fifo))               # no writer: opening it for reading would block
    one_line_error(r, "is a FIFO, not an ELF binary")


def test_directory(tmp_path):
    one_line_error(probe_info(str(tmp_path)), "is a directory, not an ELF binary")


def test_huge_sparse_file_that_is_not_elf(tmp_path):
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.truncate(64 << 30)                 # 64 GiB, no blocks: 64x the address-space limit
    one_line_error(probe_info(str(big)), "is not an ELF file")


def test_huge_sparse_file_with_an_elf_header(tmp_path):
    """An ELF header in front of 64 GiB of holes: mapped, not read; the section table points
    nowhere useful and the resolver says so in one line."""
    big = tmp_path / "sparse-elf"
    shutil.copyfile("/bin/true", big)
    with open(big, "r+b") as f:
        f.truncate(64 << 30)
    r = probe_info(str(big))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_truncated_elf(tmp_path):
    cut = tmp_path / "cut"
    data = open("/bin/true", "rb").read()
    cut.write_bytes(data[:len(data) // 2])  # the section header table is at the end: gone
    one_line_error(probe_info(str(cut)), "truncated or corrupt ELF file")


def test_empty_and_tiny_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    one_line_error(probe_info(str(tmp_path / "empty")), "is not an ELF file")
    (tmp_path / "tiny").write_bytes(b"\x7fELF\x02\x01")
    one_line_error(probe_info(str(tmp_path / "tiny")), "is not an ELF file")


def _corrupt(tmp_path, name: str, patch) -> str:
    p = tmp_path / name
    data = bytearray(open("/bin/true", "rb").read())
    patch(data)
    p.write_bytes(bytes(data))
    return str(p)


def test_corrupt_section_tables(tmp_path):
    # e_shoff (offset 0x28) far beyond the end of the file
    p = _corrupt(tmp_path, "shoff", lambda d: struct.pack_into("<Q", d, 0x28, 1 << 40))
    one_line_error(probe_info(p), "truncated or corrupt ELF file")
    # e_shnum (0x3c) huge: the table would end beyond the file
    p = _corrupt(tmp_path, "shnum", lambda d: struct.pack_into("<H", d, 0x3C, 0xFFF0))
    one_line_error(probe_info(p), "truncated or corrupt ELF file")
    # e_shentsize (0x3a) not 64
    p = _corrupt(tmp_path, "shentsize", lambda d: struct.pack_into("<H", d, 0x3A, 13))
    one_line_error(probe_info(p), "corrupt section header table")
    # e_shstrndx (0x3e) out of range
    p = _corrupt(tmp_path, "shstrndx", lambda d: struct.pack_into("<H", d, 0x3E, 0xFFF0))
    one_line_error(probe_info(p), "corrupt section header table")

    def every_section_beyond_the_end(d):
        shoff, = struct.unpack_from("<Q", d, 0x28)
        shnum, = struct.unpack_from("<H", d, 0x3C)
        for i in range(shnum):
            struct.pack_into("<QQ", d, shoff + i * 64 + 0x18, 1 << 40, 1 << 40)  # offset, size
    p = _corrupt(tmp_path, "sections", every_section_beyond_the_end)
    r = probe_info(p)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unreadable_file():
    import tempfile
    d = tempfile.mkdtemp(prefix="iotrace-unreadable-")     # traversable by anyone (0755)
    try:
        os.chmod(d, 0o755)
        p = os.path.join(d, "secret")
        with open(p, "wb") as f:
            f.write(b"\x7fELF")
        os.chmod(p, 0)
        if os.geteuid() != 0:
            one_line_error(probe_info(p), "cannot read", "Permission denied")
            return
        setpriv = shutil.which("setpriv")                # root reads anything: be nobody
        if setpriv is None:
            pytest.skip("setpriv not installed")
        r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-m", "iotrace", "probe-info", p],
                           capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_limit)
        one_line_error(r, "cannot read", "Permission denied")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_elf_file_maps_sections_not_the_file():
    """Headers are read, sections mapped one by one when asked for: nothing else."""
    with ElfFile("/bin/true") as elf:
        assert elf.build_id() and elf._maps            # the build-id note's section, mapped
        mapped = {off for off in elf._maps}
        assert mapped <= {s.offset for s in elf.sections}
        text = elf.section(".text")
        assert bytes(elf.view(text)[:4]) == elf.read(text.offset, 4)
    with pytest.raises(ElfError, match="is a character device"):
        ElfFile("/dev/null")
