#!/usr/bin/env python3
"""The VM harness's agent inside a guest: runs the host's commands and sends back what happened.

Started by the guest's init (guest/init.sh) from the 9p share tagged ``harness``; standard library
only (the guest's python3, any Debian release). It talks to tests/vm/machine.py over the
virtio-serial port named ``iotrace.agent`` (``/sys/class/virtio-ports/*/name``), one JSON object
per line each way:

    guest -> host  {"event": "hello", "uname": ..., "uptime": s}            once, when ready
    host -> guest  {"id": n, "op": "run", "argv": [...] | "sh": "...", "timeout": s,
                    "env": {...}, "cwd": "/", "stdin": base64}
    guest -> host  {"id": n, "rc": int, "stdout": base64, "stderr": base64, "seconds": s,
                    "timed_out": bool}
    host -> guest  {"id": n, "op": "ping"}       -> {"id": n, "pong": true}
    host -> guest  {"id": n, "op": "poweroff"}   -> {"id": n, "ok": true}, then the agent exits
                                                    and init powers the guest off

A command runs in a session of its own with its output in files, not pipes: a daemon it leaves
behind (``nohup serve &``) does not hold up the answer. On timeout its whole session is killed
(rc -9, timed_out true). Requests are served one at a time.
"""
import base64
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

PORT_NAME = "iotrace.agent"
MAX_OUTPUT = 16 << 20        # bytes of stdout/stderr sent back per command (the rest is cut)


def log(msg):
    try:
        with open("/dev/console", "w") as con:
            con.write(f"iotrace-vm-agent: {msg}\n")
    except OSError:
        print(f"iotrace-vm-agent: {msg}", file=sys.stderr, flush=True)


def find_port(timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in glob.glob("/sys/class/virtio-ports/*"):
            try:
                with open(os.path.join(d, "name")) as f:
                    if f.read().strip() == PORT_NAME:
                        return "/dev/" + os.path.basename(d)
            except OSError:
                pass
        time.sleep(0.2)
    return None


class Channel:
    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR)
        self.buf = b""

    def send(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def recv(self):
        """The next request; None when the port is gone."""
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 65536)
            if not chunk:           # host side not connected (yet, or any more): wait for it
                time.sleep(0.2)
                continue
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def _read_cut(f):
    f.seek(0)
    data = f.read(MAX_OUTPUT + 1)
    if len(data) > MAX_OUTPUT:
        data = data[:MAX_OUTPUT] + b"\n[agent: output cut at %d bytes]\n" % MAX_OUTPUT
    return base64.b64encode(data).decode()


def run(req):
    argv = req.get("argv") or ["/bin/sh", "-c", req["sh"]]
    env = dict(os.environ)
    env.update(req.get("env") or {})
    timeout = float(req.get("timeout") or 600)
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as inp:
        if req.get("stdin"):
            inp.write(base64.b64decode(req["stdin"]))
            inp.seek(0)
        timed_out = False
        try:
            proc = subprocess.Popen(argv, stdin=inp, stdout=out, stderr=err, env=env,
                                    cwd=req.get("cwd") or "/", start_new_session=True)
        except OSError as exc:
            return {"rc": 127, "stdout": "", "seconds": 0.0, "timed_out": False,
                    "stderr": base64.b64encode(f"agent: cannot run {argv[0]}: {exc}\n"
                                               .encode()).decode()}
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            rc = proc.wait()
        return {"rc": rc, "stdout": _read_cut(out), "stderr": _read_cut(err),
                "seconds": round(time.monotonic() - t0, 3), "timed_out": timed_out}


def main():
    path = find_port()
    if path is None:
        log(f"no virtio-serial port named {PORT_NAME}: is the virtserialport device there?")
        return 1
    ch = Channel(path)
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    ch.send({"event": "hello", "uname": " ".join(os.uname()), "uptime": uptime,
             "python": sys.version.split()[0]})
    log(f"ready on {path} after {uptime:.1f} s of uptime")
    while True:
        req = ch.recv()
        op = req.get("op")
        rid = req.get("id")
        if op == "run":
            ans = run(req)
        elif op == "ping":
            ans = {"pong": True}
        elif op == "poweroff":
            ch.send({"id": rid, "ok": True})
            log("poweroff requested")
            return 0
        else:
            ans = {"error": f"unknown op {op!r}"}
        ans["id"] = rid
        ch.send(ans)


if __name__ == "__main__":
    sys.exit(main())
