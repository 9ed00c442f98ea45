"""A Xen 4.17 host under QEMU TCG: the hypervisor, a Debian 12 Dom0, commands run in Dom0.

``Dom0.boot(image, shares)`` starts a ``vm.machine.Machine`` whose kernel is the hypervisor (QEMU's
multiboot v1 loader), Dom0's kernel and initrd its modules, with the CPU model and arguments a
nested Xen needs under TCG (found on this machine kind; tests/xen/README.md says why each):

* ``-cpu EPYC,+svm,+npt,-smap,-monitor,-xsave``: AMD SVM with nested paging emulated by TCG; SMAP
  crashes the PV Dom0's ring-3 iretq, MONITOR/MWAIT makes Xen's idle loop take #GP, XSAVE made
  numpy die with SIGFPE in Dom0;
* one pCPU (with two, Xen's default scheduler credit2 stalled the host under TCG; with one it
  runs, and ``xl sched-credit2`` is what iotrace advise drives);
* a user-mode NIC with loopback forwards (``forwards``: host 127.0.0.1:PORT -> Dom0 PORT,
  ``restrict=on``: nothing else reaches in or out), configured by ``up_network()``;
* Dom0 on ``hvc0`` (Xen's console, which goes to com1 = QEMU's serial = ``console_log``).

The harness agent (tests/vm/guest/agent.py) runs in Dom0 as a systemd service and answers over
virtio-serial. ``wait_toolstack()`` waits (bounded) until xen.service (xenstored, xenconsoled,
Dom0's xenstore entries) is up and ``xl`` answers; ``xl_create`` retries the early "Illegal pool" refusal. Every failure
is a ``MachineError`` with the last Xen and Dom0 console lines.
"""
from __future__ import annotations

import shlex
import time

from vm.machine import Machine, MachineError, Share, multiboot_modules

CPU = "EPYC,+svm,+npt,-smap,-monitor,-xsave"
XEN_ARGS = ("console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all "
            "dom0_mem=1536M,max:1536M dom0_max_vcpus=1 sched=credit2 noreboot")
DOM0_IP = "10.0.2.15/24"          # QEMU user networking's guest address
DOM0_ARGS = "root=/dev/vda rw console=hvc0 earlyprintk=xen systemd.show_status=1"
BOOT_TIMEOUT = 420.0              # to the agent's hello: Xen + Dom0 + systemd (90-100 s measured)
TOOLSTACK_TIMEOUT = 180.0
# Debian 12 starts xenstored, xenconsoled and Dom0's xenstore entries from one SysV script,
# /etc/init.d/xen (xen-utils-common), which systemd runs as xen.service.
SERVICES = ("xen.service",)


def netdev_args(forwards) -> list[str]:
    """QEMU arguments: a virtio NIC on user networking, host 127.0.0.1:H forwarded to Dom0's G for
    each (H, G) in ``forwards``; none without forwards."""
    if not forwards:
        return []
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{int(h)}-:{int(g)}" for h, g in forwards)
    return ["-netdev", f"user,id=n0,restrict=on{fwd}", "-device", "virtio-net-pci,netdev=n0"]


def machine(image, hypervisor, shares=(), name: str = "xen", forwards=()) -> Machine:
    """The (unstarted) Machine booting ``hypervisor`` with Dom0 from ``image`` (vm.image.Image).

    QEMU's multiboot -initrd splits modules at commas, so Dom0's command line names one read-only
    tag only (harness): the other read-only shares are read-only on QEMU's side (fsdev
    readonly=on), mounted read-write by the guest's init, and refuse writes all the same."""
    return Machine(hypervisor, append=XEN_ARGS,
                   initrd=multiboot_modules([(image.kernel, f"{DOM0_ARGS} iotrace.ro=harness"),
                                             (image.initrd, "")]),
                   disks=[image.rootfs], shares=list(shares), cpu=CPU, smp=1, memory_mb=3072,
                   name=name, boot_timeout=BOOT_TIMEOUT, extra_args=netdev_args(forwards))


class Dom0:
    def __init__(self, machine: Machine):
        self.m = machine

    @classmethod
    def boot(cls, image, hypervisor, shares=(), name: str = "xen", forwards=()) -> "Dom0":
        """Start QEMU and wait for the Dom0 agent's hello (bounded: BOOT_TIMEOUT)."""
        m = machine(image, hypervisor, shares, name, forwards)
        m.start()
        return cls(m)

    # -- commands --------------------------------------------------------------------------------
    def run(self, cmd, timeout: float = 120, **kw):
        return self.m.run(cmd, timeout=timeout, **kw)

    def sh(self, cmd: str, timeout: float = 120) -> str:
        """``cmd`` (shell) in Dom0; its stdout; MachineError unless it exits 0 in time."""
        return self.m.check(cmd, timeout=timeout).stdout

    def error(self, what: str, output: str = "") -> MachineError:
        return self.m._error(what, stderr=output)

    def wait_until(self, cmd: str, timeout: float, what: str, interval: float = 2.0,
                   give_up: int | None = None) -> str:
        """Run ``cmd`` until it exits 0 (bounded by ``timeout``; at once when it exits
        ``give_up``); its stdout."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.run(cmd, timeout=max(5.0, min(60.0, deadline - time.monotonic())))
            if last.ok:
                return last.stdout
            if time.monotonic() > deadline or (give_up is not None and last.rc == give_up):
                raise self.error(f"{what}: not within {timeout:g} s", last.stderr or last.stdout)
            time.sleep(interval)

    def wait_toolstack(self, timeout: float = TOOLSTACK_TIMEOUT) -> None:
        self.wait_until("systemctl is-active " + " ".join(SERVICES) + " && xl list 0 && "
                        "xenstore-read /local/domain/0/name", timeout, "Xen's toolstack ready")

    def up_network(self) -> str:
        """Dom0's NIC (the one that is not lo) up at DOM0_IP; its name."""
        dev = self.sh("ls /sys/class/net | grep -vx lo | head -n 1").strip()
        if not dev:
            raise self.error("Dom0 has no network interface (was the machine given forwards?)")
        self.sh(f"ip link set {dev} up && {{ ip -o addr show {dev} | grep -q ' {DOM0_IP} ' || "
                f"ip addr add {DOM0_IP} dev {dev}; }}")
        return dev

    def xl_create(self, cfg: str, paused: bool = False, attempts: int = 4) -> None:
        """``xl create`` (paused with -p); the toolstack refuses it for a while after boot
        ("Illegal pool specified"): retried, bounded."""
        cmd = "xl create " + ("-p " if paused else "") + shlex.quote(cfg)
        for i in range(attempts):
            r = self.run(cmd, timeout=180)
            if r.ok:
                return
            if i + 1 == attempts:
                raise self.error(f"`{cmd}` failed {attempts} times", r.stderr or r.stdout)
            time.sleep(10)

    def domid(self, name: str) -> int:
        return int(self.sh(f"xl domid {shlex.quote(name)}").strip())

    def shutdown(self) -> None:
        """Guests destroyed, QEMU gone: no wait for a clean Dom0 poweroff (the disk is a
        snapshot overlay, nothing to keep)."""
        if self.m.running():
            try:
                self.run("for d in $(xl list | awk 'NR>2 {print $1}'); do xl destroy $d; done",
                         timeout=60)
            except MachineError:
                pass
        self.m.kill()
        self.m.shutdown()           # its work directory: removed unless something failed


__all__ = ["Dom0", "Share", "CPU", "XEN_ARGS"]
