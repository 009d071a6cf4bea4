"""Start, use and stop the lab VM from the host."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

from hvlab.errors import BadInput, HvlabError
from hvlab.sys import private
from hvlab.vm import bootlog, pin, uml, xstate
from hvlab.vm.uml import VmPaths

PASS_ENV = ("CI", "HVLAB_HOME", "PYTEST_ADDOPTS", "COLUMNS", "LINES", "TERM", "NO_COLOR",
            "FORCE_COLOR", "HVLAB_TEST_HOME", "HVLAB_VERBOSE", "HVLAB_INJECT", "HVLAB_CMDLOG")
# Directories the lab VM mounts for itself: a path under them is not the host's file.
VM_PRIVATE = ("/proc", "/sys", "/dev", "/run")
DEFAULT_MEM = os.environ.get("HVLAB_VM_MEM", "2G")
# How long a command waits for another one that is starting or stopping the lab VM: a boot
# (60 s at most), a halt after a failed boot or an orderly power-off (30 s), and some slack.
LOCK_WAIT = 180.0
# When this command began to look at the lab VM: a command imports this module right before
# it asks whether the VM is up (psutil's process start time is truncated to whole seconds).
_LOOKED_AT = time.time()


def _python() -> str:
    return sys.executable


def _cmdline(paths: VmPaths, umid: str, mem: str, console: str, *, quiet: bool) -> list[str]:
    # A console that is a log keeps the kernel's errors (loglevel 4: err and worse), so a boot
    # that fails says why; one that is the user's terminal stays quiet.
    words = ["quiet", "loglevel=0"] if quiet else ["loglevel=4"]
    return [uml.UML, f"umid={umid}", f"mem={mem}", "root=/dev/root", "rootfstype=hostfs",
            "rootflags=/", "rw", *words,
            # No legacy BSD ptys: 512 fewer /dev nodes for every LVM command to scan.
            "pty.legacy_count=0",
            f"init={paths.init}", "con=null", console, f"uml_dir={paths.root}"]


def _require() -> None:
    if not uml.available():
        raise HvlabError("the lab VM needs Debian's user-mode-linux kernel: "
                         "run `make deps` (apt-get install user-mode-linux)")
    if os.geteuid() != 0:
        raise HvlabError("the lab VM must be started as root (it attaches loop devices)")
    pin.check_env()  # a bad HVLAB_VM_CPU before anything is made


def _uml_env(paths: VmPaths) -> dict[str, str]:
    """linux.uml's own environment: the host's, with the ptrace shim that fits UML's FP
    buffer to this host's XSAVE area (vm/xstate.py). HVLAB_XSTATE_SHIM=0 leaves it out;
    HVLAB_XSTATE_SHIM=FILE.so preloads that build instead (the tests' broken one)."""
    choice = os.environ.get("HVLAB_XSTATE_SHIM", "")
    if choice == "0":
        return dict(os.environ)
    env = {**os.environ, **xstate.preload(uml.shim_dir(), paths.xstate_report)}
    if choice:
        if not Path(choice).is_file():
            raise BadInput(f"HVLAB_XSTATE_SHIM={choice}: no such file; allowed: 0 (no shim) "
                           f"or the path of a built shim (.so)")
        env["LD_PRELOAD"] = os.path.abspath(choice)
    return env


def _env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    return {**env, **terminal_env(env)}


def terminal_env(env: dict[str, str]) -> dict[str, str]:
    """Tell the command inside what our stdout is: inside, its output is a pipe (or the VM's
    console), never the user's terminal. Colours and live progress only for a terminal;
    pipes and files get plain text."""
    if not sys.stdout.isatty():
        return {"NO_COLOR": "1", "TERM": "dumb"}
    out = {"TERM": env.get("TERM", "xterm-256color")}
    if "NO_COLOR" not in env:
        out["FORCE_COLOR"] = "1"
    size = shutil.get_terminal_size()
    out.setdefault("COLUMNS", env.get("COLUMNS", str(size.columns)))
    out.setdefault("LINES", env.get("LINES", str(size.lines)))
    return out


def check_visible(path: Path) -> None:
    """A path the user names must be the same file inside the lab VM (hostfs shares all but
    the VM's own mounts)."""
    p = os.path.abspath(path)
    for d in VM_PRIVATE:
        if p == d or p.startswith(d + "/"):
            raise BadInput(f"path {path} is under {d}, which the lab VM does not share "
                           f"with this host: use a path elsewhere (e.g. /var/tmp or /tmp)")


# ---------------------------------------------------------------- one-shot (ephemeral) VM
def reap_orphans() -> list[int]:
    """Kill one-shot VMs whose hvlab process is gone (a SIGKILL leaves UML's helper processes
    behind, PDEATHSIG reaches only the main one). Their umid names the owner: eph-<pid>-<id>."""
    reaped = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        umid = next((a[5:] for a in p.info["cmdline"] or [] if a.startswith("umid=eph-")), None)
        m = re.fullmatch(r"eph-(\d+)-[0-9a-f]+", umid or "")
        if not m:
            continue
        try:
            owner = psutil.Process(int(m.group(1)))
            if owner.create_time() <= p.info["create_time"] and owner.is_running():
                continue  # its hvlab process is alive
        except psutil.Error:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
            reaped.append(p.pid)
        shutil.rmtree(uml.vm_root() / str(umid), ignore_errors=True)
    return reaped


def run_ephemeral(argv: list[str], *, mem: str = DEFAULT_MEM) -> int:
    """Boot a fresh VM, run argv as root inside with the console on our stdio, power off."""
    _require()
    reap_orphans()
    root = uml.vm_root() / f"eph-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    paths = VmPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        uml.prepare(paths)
        # The console is a tty: stop it from turning \n into \r\n on our output.
        workload = ["sh", "-c", 'stty -onlcr 2>/dev/null; exec "$@"', "hvlab-run", *argv]
        paths.init.write_text(uml.init_script(paths, workload, _env()))
        paths.init.chmod(0o755)
        stdin = sys.stdin if sys.stdin and not sys.stdin.closed else None
        cmd = _cmdline(paths, root.name, mem, "con0=fd:0,fd:1", quiet=True)
        env = _uml_env(paths)
        try:
            with pin.starting() as cpu:
                proc = subprocess.Popen(cmd, stdin=stdin or subprocess.DEVNULL,
                                        stdout=sys.stdout.fileno(), stderr=subprocess.DEVNULL,
                                        start_new_session=True, env=env,
                                        preexec_fn=lambda: _in_child(cpu, die_with_parent=True))
        except OSError as exc:
            raise HvlabError(f"cannot start the lab VM: {exc}") from None
        # A one-shot VM never outlives its command: Ctrl-C, SIGTERM (a CI timeout) and SIGHUP
        # halt it; a SIGKILL of this process reaches it through PDEATHSIG.
        old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            proc.wait()
        except KeyboardInterrupt:
            _halt(root.name, paths, proc.pid, timeout=5.0)
            raise
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        rc_file = root / "rc"
        if not rc_file.exists():
            if not (root / "started").exists():
                raise HvlabError(diagnose(mem))  # it never reached the command
            raise HvlabError(f"the lab VM stopped before the command finished "
                             f"(uml exit {proc.returncode})")
        return int(rc_file.read_text().strip() or "1")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------ persistent VM
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


def up(*, mem: str = DEFAULT_MEM, timeout: float = 60.0) -> VmPaths:
    """Start the persistent VM. A command that finds the VM booting (started by a concurrent
    command) waits for it and uses it; one that finds it already running is refused."""
    _require()
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
    workload = [_python(), "-m", "hvlab.vm.agent", str(paths.spool), "--shell"]
    paths.init.write_text(uml.init_script(paths, workload, _env()))
    paths.init.chmod(0o755)
    env = _uml_env(paths)
    log = open(paths.console_log, "wb")
    with pin.starting() as cpu:
        proc = subprocess.Popen(_cmdline(paths, "hvlab", mem, "con0=null,fd:1 con1=pts",
                                         quiet=False),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env,
                                preexec_fn=lambda: _in_child(cpu, die_with_parent=False))
    log.close()  # the VM has its own copy
    paths.pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if paths.ready.exists():
            return paths
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    _halt("hvlab", paths, proc.pid)
    raise HvlabError(bootlog.failure(_read(paths.console_log), str(paths.console_log)))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def diagnose(mem: str = DEFAULT_MEM, timeout: float = 60.0) -> str:
    """A one-shot VM that never reached its command: boot once more with the kernel's errors
    kept in a log (a one-shot VM's console is the user's terminal, so it boots quiet), and
    say why in one line. The log stays in the lab VM directory."""
    root = uml.vm_root() / f"diag-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    paths = VmPaths(root)
    log_path = uml.vm_root() / "failed-boot.log"
    root.mkdir(parents=True, exist_ok=True)
    try:
        uml.prepare(paths)
        paths.init.write_text(uml.init_script(paths, ["true"], {}))
        paths.init.chmod(0o755)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(_cmdline(paths, root.name, mem, "con0=null,fd:1",
                                             quiet=False),
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=_uml_env(paths))
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _halt(root.name, paths, proc.pid, timeout=5.0)
        if (root / "rc").exists():
            return ("the lab VM stopped before the command started, and a second boot came "
                    f"up: see {log_path}")
        return bootlog.failure(_read(log_path), str(log_path))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _in_child(cpu: int | None, *, die_with_parent: bool) -> None:
    """In the child before exec: its CPU (pin.py says why), and for a one-shot VM SIGKILL
    when the hvlab process that started it dies."""
    pin.apply(cpu)
    if die_with_parent:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _halt(umid: str, paths: VmPaths, p: int, timeout: float = 20.0) -> None:
    subprocess.run(["uml_mconsole", str(paths.root / umid / "mconsole"), "halt"],
                   capture_output=True, check=False, timeout=10)
    try:
        proc = psutil.Process(p)
        proc.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        # UML runs as a process tree (one per VM process): end the whole session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p, signal.SIGKILL)
    except psutil.Error:
        pass


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
        _halt("hvlab", paths, p)
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
    req = {"argv": argv, "cwd": cwd or os.getcwd(), "env": _env()}
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
