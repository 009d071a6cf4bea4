"""The persistent lab VM from the host: start, run commands in it, its shell, stop.
One-shot VMs are oneshot.py; what both share to boot is boot.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psutil

from hvlab.errors import HvlabError
from hvlab.sys import private
from hvlab.vm import boot, bootlog, pin, uml
from hvlab.vm.uml import VmPaths

# How long a command waits for another one that is starting or stopping the lab VM: a boot
# (60 s at most), a halt after a failed boot or an orderly power-off (30 s), and some slack.
LOCK_WAIT = 180.0
# When this command began to look at the lab VM: a command imports this module right before
# it asks whether the VM is up (psutil's process start time is truncated to whole seconds).
_LOOKED_AT = time.time()


def persistent_paths() -> VmPaths:
    return VmPaths(uml.vm_root() / "lab-vm")


def pid() -> int | None:
    paths = persistent_paths()
    try:
        p = int(paths.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(p)
        if "linux.uml" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
            return p
    except psutil.Error:
        pass
    return None


def _uml_processes(paths: VmPaths) -> list[psutil.Process]:
    """Every process of the VM that keeps its state in paths.root: UML runs one host process
    per guest process, and those outlive a killed main process."""
    mark = f"uml_dir={paths.root}"
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if mark in cmd and any("linux.uml" in a for a in cmd[:1]):
            out.append(p)
    return out


def power_cut() -> set[int]:
    """Cut the lab VM's power: every process of it dies at once, nothing flushed. All of
    them, not only the kernel's: UML runs each guest process as a host process it traces,
    and a tracee whose tracer is gone runs on natively, making host system calls. The VM
    starts in a session of its own, so one killpg reaches every process of it in one
    system call. Returns the pids killed besides the kernel's."""
    main = pid()
    if main is None:
        raise HvlabError("the lab VM is not running: nothing to cut")
    procs = _uml_processes(persistent_paths())
    if os.getpgid(main) == main:
        os.killpg(main, signal.SIGKILL)
    for p in procs:  # any that left the group
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=10)
    if alive:
        raise HvlabError(f"the lab VM's processes {[p.pid for p in alive]} outlived its "
                         f"power cut")
    return {p.pid for p in procs if p.pid != main}


def _kill_strays(paths: VmPaths) -> int:
    """SIGKILL what is left of a VM whose main process is gone (a killed or crashed VM)."""
    strays = _uml_processes(paths)
    for p in strays:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(strays, timeout=5)
    return len(strays)


def is_up() -> bool:
    return pid() is not None and persistent_paths().ready.exists()


@contextlib.contextmanager
def _start_lock(paths: VmPaths, wait: float = LOCK_WAIT) -> Iterator[bool]:
    """One command at a time starts or stops the persistent VM (flock on a file in its state
    directory; a killed holder holds nothing). The fd is close-on-exec: the VM never holds it.
    Yields whether another command held the lock first (this one waited for it)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.start_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            waited = private.flock_within(fd, wait, poll=0.1)
        except TimeoutError:
            raise HvlabError(f"another hvlab command has been starting or stopping "
                             f"the lab VM for {wait:.0f} s (lock {paths.start_lock})") from None
        yield waited
    finally:
        os.close(fd)


def _came_up_while_we_looked(paths: VmPaths) -> bool:
    """The VM became ready after this command first looked at it: a concurrent command
    started it (what this one wanted), it was not already running before."""
    try:
        return paths.ready.stat().st_mtime >= _LOOKED_AT
    except OSError:
        return False


def _wait_booting(paths: VmPaths, p: int, timeout: float) -> bool:
    """A VM process without `ready` whose starter is gone (killed mid-boot): give it the
    rest of its boot time. True when it came up."""
    try:
        deadline = psutil.Process(p).create_time() + timeout
    except psutil.Error:
        return False
    while time.time() < deadline and pid() == p:
        if paths.ready.exists():
            return True
        time.sleep(0.1)
    return is_up()


def up(*, mem: str = boot.DEFAULT_MEM, timeout: float = 60.0) -> VmPaths:
    """Start the persistent VM. A command that finds the VM booting (started by a concurrent
    command) waits for it and uses it; one that finds it already running is refused."""
    boot.require()
    paths = persistent_paths()
    with _start_lock(paths) as waited:
        if is_up():
            if waited or _came_up_while_we_looked(paths):
                return paths
            raise HvlabError("the lab VM is already running (hvlab vm status)")
        p = pid()
        if p is not None:
            if _wait_booting(paths, p, timeout):
                return paths
            _down(paths)  # it never came up
        return _boot(paths, mem, timeout)


def _boot(paths: VmPaths, mem: str, timeout: float) -> VmPaths:
    _kill_strays(paths)  # helpers of a VM that was killed (a power loss of the lab VM)
    paths.root.mkdir(parents=True, exist_ok=True)
    uml.prepare(paths)
    paths.ready.unlink(missing_ok=True)
    workload = [boot.python(), "-m", "hvlab.vm.agent", str(paths.spool), "--shell"]
    paths.init.write_text(uml.init_script(paths, workload, boot.guest_env()))
    paths.init.chmod(0o755)
    env = boot.uml_env(paths)
    log = open(paths.console_log, "wb")
    with pin.starting() as cpu:
        proc = subprocess.Popen(boot.cmdline(paths, "hvlab", mem, "con0=null,fd:1 con1=pts",
                                         quiet=False),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env,
                                preexec_fn=lambda: boot.in_child(cpu, die_with_parent=False))
    log.close()  # the VM has its own copy
    paths.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if paths.ready.exists():
            return paths
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    boot.halt("hvlab", paths, proc.pid)
    raise HvlabError(bootlog.failure(boot.read(paths.console_log), str(paths.console_log)))


def down(*, timeout: float = 30.0) -> bool:
    """Orderly power-off: the agent exits and init powers off. Falls back to halt/kill."""
    paths = persistent_paths()
    if not paths.root.exists():  # never started here: only strays could be left
        return _kill_strays(paths) > 0
    with _start_lock(paths):  # a VM being started is powered off once it is up
        return _down(paths, timeout=timeout)


def _down(paths: VmPaths, *, timeout: float = 30.0) -> bool:
    p = pid()
    if p is None:
        paths.ready.unlink(missing_ok=True)
        return _kill_strays(paths) > 0
    paths.spool.mkdir(parents=True, exist_ok=True)
    (paths.spool / "shutdown.req").write_text("{}")
    try:
        psutil.Process(p).wait(timeout=timeout)
    except psutil.TimeoutExpired:
        boot.halt("hvlab", paths, p)
    except psutil.Error:
        pass
    paths.ready.unlink(missing_ok=True)
    paths.pid_file.unlink(missing_ok=True)
    _kill_strays(paths)
    return True


INTERRUPT_WAIT_S = 300.0


def run_in(argv: list[str], *, cwd: str | None = None, timeout: float | None = None) -> int:
    """Run argv in the persistent VM; stream its output here; return its exit status."""
    if not is_up():
        raise HvlabError("the lab VM is not running: start it with `hvlab vm up`")
    spool = persistent_paths().spool
    rid = uuid.uuid4().hex
    req = {"argv": argv, "cwd": cwd or os.getcwd(), "env": boot.guest_env()}
    tmp = spool / f".{rid}.tmp"
    tmp.write_text(json.dumps(req))
    os.replace(tmp, spool / f"{rid}.req")
    out_f, err_f, rc_f = (spool / f"{rid}.{s}" for s in ("out", "err", "rc"))
    # Our heartbeat: a new file each second, named by the time. hostfs shows the VM a new
    # name at once (a directory listing), where an mtime could be cached.
    alive_f = spool / f"{rid}.alive-{int(time.time())}"
    alive_f.touch()
    beat = time.monotonic()
    pos = {"out": 0, "err": 0}
    deadline = None if timeout is None else time.monotonic() + timeout

    def pump() -> None:
        for name, path, sink in (("out", out_f, sys.stdout), ("err", err_f, sys.stderr)):
            try:
                with open(path, "rb") as f:
                    f.seek(pos[name])
                    data = f.read()
            except FileNotFoundError:
                continue
            if data:
                pos[name] += len(data)
                sink.buffer.write(data)
                sink.flush()

    def wait(until: float | None) -> bool:
        nonlocal beat, alive_f
        while not rc_f.exists():
            pump()
            if pid() is None:
                raise HvlabError("the lab VM stopped while the command ran")
            if until is not None and time.monotonic() > until:
                return False
            if time.monotonic() - beat > 1.0:
                old, alive_f = alive_f, spool / f"{rid}.alive-{int(time.time())}"
                alive_f.touch()
                if old != alive_f:
                    old.unlink(missing_ok=True)
                beat = time.monotonic()
            time.sleep(0.05)
        pump()
        return True

    try:
        if not wait(deadline):
            (spool / f"{rid}.kill").write_text("")
            raise HvlabError(f"command timed out in the lab VM: {argv[0]}")
        return int(rc_f.read_text().strip() or "1")
    except KeyboardInterrupt:
        # Ctrl-C: the command inside gets SIGTERM and unwinds; show that, then exit 130.
        # A second Ctrl-C leaves at once (the command still finishes its unwind).
        (spool / f"{rid}.kill").write_text("")
        sys.stderr.write("hvlab: interrupting the command in the lab VM "
                         "(Ctrl-C again to leave it unwinding)\n")
        wait(time.monotonic() + INTERRUPT_WAIT_S)
        raise
    finally:
        for p in (out_f, err_f, rc_f, alive_f):
            p.unlink(missing_ok=True)


def mconsole(*command: str) -> str:
    """Ask the VM's management console (a host Unix socket) and return its answer."""
    sock = persistent_paths().root / "hvlab" / "mconsole"
    res = subprocess.run(["uml_mconsole", str(sock), *command], capture_output=True,
                         text=True, check=False, timeout=10)
    return res.stdout.strip()


def console_pty() -> str:
    """The host pty of the VM's second console, where the agent keeps a root shell."""
    found = re.findall(r"pts:(/dev/pts/\d+)", mconsole("config", "con1"))
    if not found:
        raise HvlabError("the lab VM has no shell console (was it started by `hvlab vm up`?)")
    return str(found[0])


def shell() -> None:
    """Attach this terminal to the VM's root shell. Ctrl-] detaches."""
    import termios
    import tty

    if not is_up():
        raise HvlabError("the lab VM is not running: start it with `hvlab vm up`")
    fd = os.open(console_pty(), os.O_RDWR | os.O_NOCTTY)
    interactive = sys.stdin.isatty()
    old = termios.tcgetattr(sys.stdin.fileno()) if interactive else None
    if interactive:
        tty.setraw(sys.stdin.fileno())
    sys.stdout.write("hvlab: attached to the lab VM (Ctrl-] detaches)\r\n")
    sys.stdout.flush()
    os.write(fd, b"\n")
    try:
        while True:
            r, _, _ = select.select([sys.stdin.fileno(), fd], [], [])
            if fd in r:
                data = os.read(fd, 4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if sys.stdin.fileno() in r:
                data = os.read(sys.stdin.fileno(), 4096)
                if not data or b"\x1d" in data:
                    break
                os.write(fd, data)
    finally:
        if old is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old)
        os.close(fd)
        sys.stdout.write("\r\nhvlab: detached\r\n")
