"""`hvlab explain --png/--svg`: the matplotlib timeline from a run record and its events (no
root). The fixture has the shapes engine.py writes: a windows VM with two disks, steps 1-14."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hvlab.lab.record import Event, Run
from hvlab.report import draw, geometry
from hvlab_fixtures.pictures import check_png, check_svg

RID = "r20260101120000abcd"
T = 1_700_000_000.0  # the run's registration: x = 0


def lv(disk: str, kind: str, vm: str = "vm01") -> str:
    return f"{vm}_{disk}_{kind}_{RID}" if kind else f"{vm}_{disk}"


def make_run(vms: tuple[str, ...] = ("vm01",)) -> dict[str, Any]:
    def vm(name: str) -> dict[str, Any]:
        return {
            "profile": "windows", "answers": True, "auto_recovery": True,
            "class": "application-consistent", "frozen": False, "t0": T + 12.1,
            "window": {"freeze_start": T + 10.34, "frozen_at": T + 10.36, "open_txid": 174,
                       "thawed_at": T + 14.07, "seconds": 3.725, "guest_frozen_for_s": 3.7},
            "freeze_reply": {"timeout_s": 10.0},
            "disks": {d: {"B": lv(d, "", name), "C": lv(d, "c", name), "A": lv(d, "a", name),
                          "S_B": lv(d, "sb", name), "S_A": lv(d, "sa", name),
                          "ctl": f"hvlab_t_ctl_{name}_{d}", "fs": fs,
                          "size": 512 << 20} for d, fs in (("disk0", "ext4"), ("disk1", "xfs"))},
        }

    ranges = [{"kind": "different", "offset": 0, "length": 65536},
              {"kind": "different", "offset": 262144, "length": 131072}]
    return {"id": RID, "lab": "t", "vms": list(vms), "state": "done", "mode": "on-host",
            "created": T, "dest": "/nowhere", "vm": {v: vm(v) for v in vms},
            "images": {f"{v}/{d}": {"file": f"{v}_{d}.img", "sha256": "0" * 64,
                                    "auto_recovery_ranges": ranges}
                       for v in vms for d in ("disk0", "disk1")}}


# step, start, end (seconds since T), where vm01's writes go after it, detail
STEPS: list[tuple[int, float, float, str, dict[str, Any]]] = [
    (1, 0.67, 0.67, "B", {"disks": ["disk0", "disk1"], "profile": "windows"}),
    (2, 3.66, 3.67, "B", {"answers": True, "class": "application-consistent"}),
    (3, 7.08, 7.09, "B", {"state": "prepared"}),
    (4, 10.34, 10.37, "B", {"frozen": ["/mnt/disk0", "/mnt/disk1"], "open_txid": 174}),
    (5, 10.63, 12.72, "C", {"made": [lv("disk0", "c"), lv("disk1", "c")]}),
    (6, 12.95, 13.80, "C", {"made": [lv("disk0", "a"), lv("disk1", "a")]}),
    (7, 13.92, 13.93, "C", {"t0": T + 12.1}),
    (8, 14.04, 14.08, "C", {"window_s": 3.725, "timed_out": False}),
    (9, 22.22, 22.23, "C", {"state": "thawed", "committed_txid": 267}),
    (10, 29.02, 31.49, "C", {"repaired": {"last_txid": 173}, "consistent_after": True}),
    (11, 38.44, 41.12, "C", {"made": [lv(d, k) for d in ("disk0", "disk1") for k in ("sb", "sa")]}),
    (12, 46.09, 47.21, "C", {"removed": [lv("disk0", "a"), lv("disk1", "a")]}),
    (13, 52.74, 55.37, "C", {"images": {}}),
    (14, 60.12, 72.38, "B", {"removed": [lv(d, k) for d in ("disk0", "disk1")
                                         for k in ("sb", "sa")],
                             "merged": [f"{lv(d, 'c')} -> {lv(d, '')}"
                                        for d in ("disk0", "disk1")]}),
]


def make_events() -> list[dict[str, Any]]:
    out = []
    for n, start, end, writes, detail in STEPS:
        in_freeze = 4 <= n <= 7
        out.append({
            "run": RID, "step": n, "name": f"step {n}", "vm": "vm01" if n <= 10 else None,
            "in_freeze": in_freeze, "start": T + start, "end": T + end, "detail": detail,
            "devices_created": [], "devices_removed": [],
            "writes_to": {f"vm01/{d}": {"lv": lv(d, "c" if writes == "C" else ""),
                                        "artifact": writes} for d in ("disk0", "disk1")},
            "fingerprints": None if in_freeze else {},
        })
    return out


def build(run: dict[str, Any], events: list[dict[str, Any]], state: str | None = None
          ) -> geometry.Timeline:
    """The fixtures are in run.json's and events.jsonl's shapes: typed as the loaders do."""
    return geometry.build(Run.from_dict(run), [Event.from_dict(e) for e in events], state)


def save(run: dict[str, Any], events: list[dict[str, Any]], path: Path) -> Path:
    return draw.save(Run.from_dict(run), [Event.from_dict(e) for e in events], path)


def test_build_places_bars_writes_and_window() -> None:
    tl = build(make_run(), make_events())
    bars = {sp.lane: (sp.start, sp.end) for sp in tl.artifacts}
    assert bars["vm01/disk0 B"] == (0.0, tl.t_end)
    assert abs(bars["vm01/disk0 C"][0] - 10.63) < 1e-6  # made by step 5
    assert abs(bars["vm01/disk0 C"][1] - 72.38) < 1e-6  # merged by step 14
    assert abs(bars["vm01/disk1 A"][0] - 12.95) < 1e-6 and abs(bars["vm01/disk1 A"][1]
                                                               - 47.21) < 1e-6
    assert abs(bars["vm01/disk0 S_A"][0] - 38.44) < 1e-6
    writes = sorted((sp.lane, round(sp.start, 2), round(sp.end, 2))
                    for sp in tl.writes if sp.lane.startswith("vm01/disk0"))
    assert writes == [("vm01/disk0 B", 0.0, 12.72), ("vm01/disk0 B", 72.38, 72.38),
                      ("vm01/disk0 C", 12.72, 72.38)]
    (w,) = tl.windows
    assert abs(w.start - 10.34) < 1e-6 and w.seconds == 3.725 and w.limit == 10.0
    assert [m.label for m in tl.steps] == [str(n) for n in range(1, 15)]
    assert tl.notes["vm01/disk0 A"] == "auto-recovery changed 192 KiB in 2 ranges"
    assert {sp.lane for sp in tl.recovery} == {"vm01/disk0 A", "vm01/disk1 A"}


def test_png_and_svg_are_real_pictures(tmp_path: Path) -> None:
    run, events = make_run(), make_events()
    png = save(run, events, tmp_path / "t.png")
    check_png(png)
    svg = save(run, events, tmp_path / "t.svg")
    # each step label is a group with its id, its text as a comment
    check_svg(svg, [f'<g id="step-{n}">\n    <!-- {n} -->' for n in range(1, 15)] + [
        '<g id="end">\n    <!-- done -->', "frozen 3.73 s of the 10 s flush-and-hold limit",
        RID, "application-consistent", "auto-recovery changed 192 KiB in 2 ranges"])


def test_paused_failed_and_two_vm_runs_draw(tmp_path: Path) -> None:
    # Paused after step 11: A, C, S still there; a second VM (crash-consistent, no window).
    run = make_run(("vm01", "vm02"))
    run["state"] = "paused"
    run["vm"]["vm02"].update(answers=False, auto_recovery=False, window=None,
                             **{"class": "crash-consistent"})
    del run["images"]
    one = make_events()[:10]
    two = [{**ev, "vm": "vm02", "start": ev["start"] + 40, "end": ev["end"] + 40,
            "writes_to": {k.replace("vm01", "vm02"): v for k, v in ev["writes_to"].items()},
            "detail": {k: [x.replace("vm01", "vm02") for x in v] for k, v in
                       ev["detail"].items() if k == "made"} if ev["step"] in (5, 6) else
            {"skipped": "no integration services"}} for ev in one]
    s11 = {**make_events()[10], "start": T + 80.0, "end": T + 83.0}
    s11["detail"] = {"made": [lv(d, k, v) for v in ("vm01", "vm02") for d in ("disk0", "disk1")
                              for k in ("sb", "sa")]}
    events = one + two + [s11]
    tl = build(run, events)
    assert any(sp.open_end and sp.lane == "vm02/disk1 S_A" for sp in tl.artifacts)
    assert "crash-consistent" in tl.guest_notes["vm02"]
    assert [w.vm for w in tl.windows] == ["vm01"]
    check_png(save(run, events, tmp_path / "paused.png"))
    # Failed in step 6 and unwound: C and A end at the unwind, no thaw recorded.
    run = make_run()
    run["state"] = "failed"
    del run["vm"]["vm01"]["window"]["seconds"]
    del run["images"]
    unwind: dict[str, Any] = {"run": RID, "step": None, "name": "unwind (failed)", "vm": None,
                              "start": T + 15.0, "end": T + 15.0, "detail": {"notes": []},
                              "writes_to": {f"vm01/{d}": {"lv": lv(d, ""), "artifact": "B"}
                                            for d in ("disk0", "disk1")}}
    events = [*make_events()[:5], unwind]
    tl = build(run, events)
    assert {sp.lane: sp.end for sp in tl.artifacts}["vm01/disk1 C"] == 15.0
    assert tl.windows[0].seconds is None and tl.steps[-1].label == "U"
    check_png(save(run, events, tmp_path / "failed.png"))


def test_a_state_override() -> None:
    """A run whose process died is drawn as `interrupted`, whatever its record says."""
    tl = build(make_run(), make_events(), state="interrupted")
    assert tl.end_label == "interrupted" and "interrupted" in tl.title
    assert all(sp.open_end for sp in tl.artifacts if sp.lane.endswith(" B"))
    assert build(make_run(), make_events()).end_label == "done"
