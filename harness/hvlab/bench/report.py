"""`make bench`'s results: what they ran on, the ratios and the table (plots.py draws them).

Pure functions of the results dict (no devices), so tests/unit/test_bench.py checks them;
`machine()` and `git_commit()` only read /proc and the repository. Shape of bench.json:

    meta:    kernel, runner, machine {cpus, cpu_model, mem_bytes}, date, git_commit, quick,
             parts_s {part: seconds}
    floor:   bench_floor.measure() (suspend + create_snap + resume of N thin devices)
    window:  {limit_s, disk_size, profile, points: [{disks, window_s, floor_s, skew, wall_s,
             run, state, class, error}]}
    jobs:    {points: [{vms, wall_s (median of walls_s), walls_s, ratio_to_one, quiet_wall_s,
             quiet_ratio (the guests' writers paused), windows_s, run, state, error}]}
    steps:   {lab, vm, wall_s, steps_s, run, state, error, steps: [{step, name, vm, seconds}]}
    reader:  {virtual_bytes, mapped_bytes, extents, repeat, ours_s, dd_s, ours_median_s,
             dd_median_s, ours_MiB_s, dd_MiB_s, ratio, goal}
    goals:   [{what, goal, measured, ok}]: the issues' goals against this run
    errors:  {part: "what failed"}
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

WINDOW_LIMIT_S = 10.0  # the guest's flush-and-hold limit (VSS_E_FLUSH_WRITES_TIMEOUT)
READER_GOAL = 0.9  # issue 10: the reader at least 0.9x dd's throughput on the same extents
OFFHOST_GOAL = 0.8  # issue 11: off-host at least 0.8x on-host reading of the same extents
INCR_GOAL = 1.1  # issue 11: an incremental reads at most 1.1x the bytes that changed
KEYS = ("meta", "floor", "window", "jobs", "steps", "reader", "goals", "errors")


# ----------------------------------------------------------------------------- what it ran on
def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "vendor_id", "cpu model") and value.strip():
                model = value.strip()
                if key.strip() == "model name":
                    break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model or "unknown", "mem_bytes": mem}


def git_commit(repo: Path) -> str:
    """HEAD of the checkout the bench runs from, '+dirty' when tracked files differ."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], check=True, capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------ math
def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def mib_s(nbytes: int, seconds: float | None) -> float | None:
    return nbytes / seconds / (1 << 20) if seconds else None


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either is missing or den is 0."""
    return num / den if num is not None and den else None


def reader_summary(mapped: int, ours: list[float], dd: list[float]) -> dict[str, Any]:
    """Throughputs over the mapped bytes both read, and ours / dd (>= READER_GOAL wanted)."""
    om, dm = median(ours), median(dd)
    o, d = mib_s(mapped, om), mib_s(mapped, dm)
    return {"ours_median_s": om, "dd_median_s": dm, "ours_MiB_s": o, "dd_MiB_s": d,
            "ratio": ratio(o, d), "goal": READER_GOAL}


def offhost_summary(mapped: int, ours: list[float], off: list[float]) -> dict[str, Any]:
    """Off-host (NBD over the veth) against on-host reading of the same extents."""
    om, fm = median(ours), median(off)
    o, f = mib_s(mapped, om), mib_s(mapped, fm)
    return {"median_s": fm, "MiB_s": f, "ratio": ratio(f, o), "goal": OFFHOST_GOAL}


def job_ratios(points: list[dict[str, Any]]) -> None:
    """Each job point's wall time over the one-VM job's (in place), with the guests' writers
    running (the goal's figure) and paused (the engine's own scaling)."""
    one = next((p for p in points if p["vms"] == 1 and not p.get("error")), {})
    for p in points:
        p["ratio_to_one"] = None if p.get("error") else ratio(p["wall_s"], one.get("wall_s"))
        p["quiet_ratio"] = None if p.get("error") else ratio(p.get("quiet_wall_s"),
                                                              one.get("quiet_wall_s"))


def floor_s(floor: dict[str, Any] | None, n: int) -> float | None:
    """The floor at kernel speed for n thin devices (ioctl median) from bench_floor's result."""
    try:
        return float((floor or {})["counts"][str(n)]["ioctl"]["median_s"])
    except (KeyError, TypeError, ValueError):
        return None


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's goals against this run: {what, goal, measured, ok} (ok None: not measured)."""
    out: list[dict[str, Any]] = []

    def add(what: str, goal: str, value: float | None, limit: float, unit: str = "s",
            at_least: bool = False) -> None:
        ok = None if value is None else value >= limit if at_least else value <= limit
        shown = "-" if value is None else f"{value:.2f}{'x' if unit == 'x' else ' s'}"
        out.append({"what": what, "goal": goal, "measured": shown, "ok": ok})

    wins = {p["disks"]: (None if p.get("error") else p.get("window_s"))
            for p in (res.get("window") or {}).get("points", [])}
    walls = {p["disks"]: (None if p.get("error") else p.get("wall_s"))
             for p in (res.get("window") or {}).get("points", [])}
    if 1 in wins:
        add("freeze window, 1 disk", "< 0.3 s", wins[1], 0.3)
    for n in sorted(wins):
        if n > 1 and wins.get(1) is not None:
            add(f"freeze window growth, {n} disks", f"<= 1-disk + {60 * (n - 1)} ms", wins[n],
                wins[1] + 0.06 * (n - 1))
    if 8 in wins:
        add("freeze window, 8 disks", "< 1.0 s", wins[8], 1.0)
        add("job wall time, one VM of 8 disks", "<= 60 s", walls.get(8), 60.0)
    st = res.get("steps") or {}
    if st:
        add("job wall time, default vm01", "<= 20 s",
            None if st.get("error") else st.get("wall_s"), 20.0)
    for p in (res.get("jobs") or {}).get("points", []):
        if p["vms"] == 8:
            add("job of 8 one-disk VMs vs one VM", "<= 8.5x", p.get("ratio_to_one"), 8.5, "x")
    r = res.get("reader") or {}
    if r:
        add("reader vs dd, same extents + sha256", f">= {READER_GOAL:g}x", r.get("ratio"),
            READER_GOAL, "x", at_least=True)
        o = r.get("off_host") or {}
        if o:
            add("off-host (NBD over veth) vs on-host, same extents", f">= {OFFHOST_GOAL:g}x",
                o.get("ratio"), OFFHOST_GOAL, "x", at_least=True)
    for p in (res.get("incremental") or {}).get("points", []):
        add(f"incremental, {p['share']:.0%} changed: bytes read / changed",
            f"<= {INCR_GOAL:g}x", p.get("ratio"), INCR_GOAL, "x")
    return out


def check_shape(res: dict[str, Any]) -> list[str]:
    """What is missing from a results dict (the JSON's top keys and meta's fields)."""
    out = [f"no {k}" for k in KEYS if k not in res]
    meta = res.get("meta") or {}
    out += [f"no meta.{k}" for k in ("kernel", "runner", "machine", "date", "git_commit")
            if k not in meta]
    return out


# ----------------------------------------------------------------------------------- table
def _s(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if unit == "ms" else f"{x:.2f} s"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}x" if x >= 100 else f"{x:.2f}x"


def _skew(skew: Any) -> str:
    if not skew:
        return "-"
    vals = [v for v in _numbers(skew)]
    return f"{max(vals) * 1000:.1f} ms max" if vals else str(skew)[:30]


def _numbers(x: Any) -> list[float]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, dict):
        return [v for y in x.values() for v in _numbers(y)]
    if isinstance(x, list):
        return [v for y in x for v in _numbers(y)]
    return []


def _err(e: str | None) -> str:
    """The reason, not the run's preamble: "run R failed and was unwound: WHY" -> WHY."""
    if not e:
        return ""
    why = e.rpartition("was unwound: ")[2]
    return "FAILED: " + (why if len(why) <= 90 else why[:87] + "...")


def tables(res: dict[str, Any]) -> list[Table]:
    out: list[Table] = []
    w = res.get("window") or {}
    t = Table(title=f"1. freeze window, one VM of N disks ({w.get('disk_size', '?')} "
                    f"{w.get('fs', 'ext4')}, profile {w.get('profile', '?')}); "
                    f"limit {w.get('limit_s', WINDOW_LIMIT_S):g} s")
    for col in ("disks", "window (run record)", "floor (ioctl)", "x floor", "skew",
                "job wall", "note"):
        t.add_column(col)
    for p in w.get("points", []):
        t.add_row(str(p["disks"]), _s(p.get("window_s")), _s(p.get("floor_s"), "ms"),
                  _x(ratio(p.get("window_s"), p.get("floor_s"))), _skew(p.get("skew")),
                  _s(p.get("wall_s")), _err(p.get("error")) or (p.get("class") or ""))
    out.append(t)
    j = res.get("jobs") or {}
    t = Table(title="2a. job wall time, N VMs of one disk in one job (median of the runs; "
                    "then once with the guests' writers paused)")
    for col in ("VMs", "wall", "x one VM", "runs", "writers paused", "x one VM (paused)",
                "windows", "note"):
        t.add_column(col)
    for p in j.get("points", []):
        wins = [v for v in (p.get("windows_s") or {}).values() if v is not None]
        t.add_row(str(p["vms"]), _s(p.get("wall_s")), _x(p.get("ratio_to_one")),
                  " / ".join(f"{w:.2f}" for w in p.get("walls_s") or []) or "-",
                  _s(p.get("quiet_wall_s")), _x(p.get("quiet_ratio")),
                  f"{min(wins):.2f}-{max(wins):.2f} s" if wins else "-", _err(p.get("error")))
    out.append(t)
    st = res.get("steps") or {}
    t = Table(title=f"2b. steps of the default backup of {st.get('vm', 'vm01')}")
    for col in ("step", "name", "vm", "time"):
        t.add_column(col)
    for s in st.get("steps", []):
        t.add_row(str(s["step"]), s["name"], s.get("vm") or "job", _s(s["seconds"]))
    if st:
        t.add_row("", "all steps' own time", "", _s(st.get("steps_s")))
        t.add_row("", "job wall time", "", _s(st.get("wall_s")))
        if st.get("error"):
            t.add_row("", _err(st.get("error")), "", "")
    out.append(t)
    r = res.get("reader") or {}
    t = Table(title=f"3. full-backup reader vs dd, the same {r.get('extents', '?')} mapped "
                    f"extents ({(r.get('mapped_bytes') or 0) >> 20} MiB of "
                    f"{(r.get('virtual_bytes') or 0) >> 20} MiB) + sha256, "
                    f"median of {r.get('repeat', '?')}")
    for col in ("what", "time", "MiB/s", "ours / dd (goal >= 0.9)"):
        t.add_column(col)
    if r.get("ours_median_s") is not None:
        t.add_row("read_image (O_DIRECT, sha256 of the image, sparse image written)",
                  _s(r["ours_median_s"]), f"{r['ours_MiB_s']:.0f}", _x(r.get("ratio")))
        t.add_row("dd iflag=direct per extent | sha256sum", _s(r["dd_median_s"]),
                  f"{r['dd_MiB_s']:.0f}", "")
        o = r.get("off_host") or {}
        if o.get("median_s") is not None:
            t.add_row(f"off-host: nbdkit -> veth -> libnbd proxy, same image (vs read_image "
                      f"{_x(o.get('ratio'))}, goal >= {OFFHOST_GOAL:g}x; link setup "
                      f"{_s(o.get('setup_s'))})", _s(o["median_s"]), f"{o['MiB_s']:.0f}", "")
    out.append(t)
    inc = res.get("incremental") or {}
    if inc.get("points"):
        t = Table(title=f"4. incrementals: bytes read against bytes changed since the reference "
                        f"({inc['files_bytes'] >> 20} MiB of files on a "
                        f"{inc['disk_bytes'] >> 20} MiB disk, overwritten in place)")
        for col in ("changed", "changed MiB", "read MiB", "read / changed (goal <= 1.1)",
                    "extents", "thin_delta", "read"):
            t.add_column(col)
        for p in inc["points"]:
            t.add_row(f"{p['share']:.0%}", f"{p['changed_bytes'] / 2**20:.1f}",
                      f"{p['read_bytes'] / 2**20:.1f}", _x(p["ratio"]), str(p["extents"]),
                      _s(p["thin_delta_s"]), _s(p["read_s"]))
        out.append(t)
    mo = res.get("models") or {}
    if mo.get("points"):
        t = Table(title=f"5. the Hyper-V generations on the default lab, backup of "
                        f"{mo.get('vm', 'vm01')}, median of {mo.get('rounds', '?')} (order "
                        f"rotated each round)")
        for col in ("model", "steps", "freeze window", "job wall", "windows", "walls", "note"):
            t.add_column(col)
        for p in mo["points"]:
            t.add_row(p["model"], str(p["steps"]), _s(p.get("window_s")), _s(p.get("wall_s")),
                      " / ".join(f"{w:.2f}" for w in p.get("windows_s") or []) or "-",
                      " / ".join(f"{w:.1f}" for w in p.get("walls_s") or []) or "-",
                      _err(p.get("error")))
        out.append(t)
    return out


def render_text(res: dict[str, Any]) -> str:
    m = res.get("meta") or {}
    mach = m.get("machine") or {}
    head = (f"hvlab bench {m.get('date', '?')}  commit {m.get('git_commit', '?')}\n"
            f"kernel {m.get('kernel', '?')}, runner {m.get('runner', '?')}, "
            f"{mach.get('cpus', '?')} cpus ({mach.get('cpu_model', '?')}), "
            f"{(mach.get('mem_bytes') or 0) >> 20} MiB"
            f"{', quick' if m.get('quick') else ''}\n")
    console = Console(record=True, width=170, file=io.StringIO(), color_system=None)
    for t in tables(res):
        console.print(t)
    g = Table(title="goals (issues 10 and 11)")
    for col in ("what", "goal", "measured", ""):
        g.add_column(col)
    for row in goals(res):
        g.add_row(row["what"], row["goal"], row["measured"],
                  {True: "ok", False: "MISSED", None: "not measured"}[row["ok"]])
    console.print(g)
    errors = res.get("errors") or {}
    tail = "".join(f"FAILED part {k}: {v}\n" for k, v in errors.items())
    return head + console.export_text() + tail
