"""The one event model every source speaks: guest I/O requests as columnar batches.

A batch is a NumPy structured array of ``EVENT_DTYPE``; one row per I/O request that a guest sent
towards a device (one ioreq_t for the qemu-dm probes, one TRC_HVM_IO* record for xentrace, one row of
a recording). Sources that are fast (xentrace decoding, replay) produce whole batches; the live probes
produce them in metrics mode as pre-aggregated rows instead (see ``iotrace.core.aggregate``).

Field meanings follow Xen's ioreq_t (xen/include/public/hvm/ioreq.h):

* ``type``: IOREQ_TYPE_PIO 0, IOREQ_TYPE_COPY 1 (MMIO), IOREQ_TYPE_PCI_CONFIG 2,
  IOREQ_TYPE_VMWARE_PORT 3 (QEMU only), IOREQ_TYPE_TIMEOFFSET 7, IOREQ_TYPE_INVALIDATE 8.
* ``dir``: IOREQ_WRITE 0, IOREQ_READ 1 (the ioreq_t bit, 1 = read).
* ``size``: bytes per access (0 when the source does not know it: xentrace does not record it).
* ``count``: repetitions (rep ins/outs/movs); 1 for a single access.
* ``data_is_ptr``: data is a guest physical address of a buffer (rep), not a value.
* ``vcpu``: -1 when unknown (buffered ioreqs, records of a pCPU whose current vCPU is unknown).
* ``domid``: -1 when unknown (xentrace records before the pCPU's first runstate record).
* ``service_ns``: time to serve the request in ns, -1 when unknown.
* ``data``: the value written or read. Guest data (keystrokes pass through port 0x60): it is kept for
  ``snoop`` and recordings only and never becomes a metric or a label.
* ``rip``: the guest instruction pointer of the VM exit that caused the request (xentrace's
  VMEXIT/VMEXIT64 records carry it), 0 when unknown (the qemu probes cannot see it). Like an
  address it is never a label: reports group by it on request.
"""
from __future__ import annotations

import numpy as np

# ioreq_t type codes (xen/include/public/hvm/ioreq.h; VMWARE_PORT from QEMU's xen headers).
TYPE_PIO = 0
TYPE_MMIO = 1          # IOREQ_TYPE_COPY
TYPE_PCI_CONFIG = 2
TYPE_VMWARE_PORT = 3
TYPE_TIMEOFFSET = 7
TYPE_INVALIDATE = 8

TYPE_NAMES = {
    TYPE_PIO: "pio",
    TYPE_MMIO: "mmio",
    TYPE_PCI_CONFIG: "pci_config",
    TYPE_VMWARE_PORT: "vmware_port",
    TYPE_TIMEOFFSET: "timeoffset",
    TYPE_INVALIDATE: "invalidate",
}
TYPE_CODES = {v: k for k, v in TYPE_NAMES.items()}

DIR_WRITE = 0
DIR_READ = 1
DIR_NAMES = {DIR_WRITE: "write", DIR_READ: "read"}
DIR_CODES = {v: k for k, v in DIR_NAMES.items()}

UNKNOWN = -1

EVENT_DTYPE = np.dtype([
    ("ts_ns", np.int64),        # ns since the source's epoch (monotonic; xentrace: TSC / cpu_hz)
    ("domid", np.int32),
    ("vcpu", np.int32),
    ("type", np.uint8),
    ("dir", np.uint8),
    ("data_is_ptr", np.uint8),
    ("df", np.uint8),
    ("size", np.uint32),
    ("count", np.uint32),
    ("addr", np.uint64),
    ("data", np.uint64),
    ("service_ns", np.int64),
    ("rip", np.uint64),         # guest RIP of the causing exit, 0 = unknown
])


def empty(n: int = 0) -> np.ndarray:
    """A batch of ``n`` events with every field at its 'unknown' value."""
    batch = np.zeros(n, dtype=EVENT_DTYPE)
    batch["domid"] = UNKNOWN
    batch["vcpu"] = UNKNOWN
    batch["count"] = 1
    batch["service_ns"] = UNKNOWN
    return batch


def concat(batches) -> np.ndarray:
    """One batch from many (an empty batch from none)."""
    batches = [b for b in batches if len(b)]
    if not batches:
        return empty(0)
    return np.concatenate(batches)


def type_name(code: int) -> str:
    return TYPE_NAMES.get(int(code), f"type{int(code)}")


def dir_name(code: int) -> str:
    return DIR_NAMES.get(int(code), f"dir{int(code)}")


def request_bytes(batch: np.ndarray) -> np.ndarray:
    """Bytes moved per request (size x count); 0 where the size is unknown."""
    return batch["size"].astype(np.uint64) * batch["count"].astype(np.uint64)


def pci_config_address(addr: int) -> str:
    """A PCI_CONFIG request's address as BDF + register: ``00:01.1+0x3c`` (``SSSS:`` first when
    the segment is not 0). ioreq_t's addr for IOREQ_TYPE_PCI_CONFIG is SEG[63:48] BUS[47:40]
    DEV[39:35] FN[34:32] REG[31:0]: Xen builds it as ``(sbdf << 32) | reg`` when it forwards a
    0xcfc-0xcff access (arch_ioreq_server_get_type_addr, xen/arch/x86/hvm/ioreq.c; earlier
    hvm_select_ioreq_server)."""
    addr = int(addr) & 0xFFFFFFFFFFFFFFFF
    sbdf, reg = addr >> 32, addr & 0xFFFFFFFF
    seg, bus, dev, fn = sbdf >> 16, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F, sbdf & 7
    head = f"{seg:04x}:" if seg else ""
    return f"{head}{bus:02x}:{dev:02x}.{fn}+{reg:#x}"


def format_address(type_code: int, addr: int) -> str:
    """An address as an operator reads it: PCI config as BDF + register, others in hex."""
    if int(type_code) == TYPE_PCI_CONFIG:
        return pci_config_address(addr)
    return f"{int(addr) & 0xFFFFFFFFFFFFFFFF:#x}"
