"""`hvlab restore` (a new VM disk set from a backup) and `hvlab verify` (is the backup good?)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from hvlab.backup import chain, manifest, reader
from hvlab.errors import BadInput, HvlabError
from hvlab.guest import ledger
from hvlab.lab.definition import check_name
from hvlab.lab.handle import Lab
from hvlab.lab.paths import ROLE_TAG
from hvlab.lab.state import write_json_atomic
from hvlab.sys import dm, fs, private
from hvlab.sys.uevents import wait_node


def _pick_vm(man: dict[str, Any], vm: str | None) -> dict[str, Any]:
    vms = man["vms"]
    if vm is None:
        if len(vms) != 1:
            raise BadInput(f"this backup holds {len(vms)} VMs "
                           f"({', '.join(v['name'] for v in vms)}): choose one with --vm")
        chosen: dict[str, Any] = vms[0]
        return chosen
    for v in vms:
        if v["name"] == vm:
            found: dict[str, Any] = v
            return found
    raise BadInput(f"VM {vm!r} is not in this backup")


def check_images(path: Path, vmrec: dict[str, Any]) -> list[dict[str, Any]]:
    """Each image's sha256 against the manifest; `problem` says what is wrong with one."""
    out = []
    for d in vmrec["disks"]:
        img = path / str(d["image"])
        actual: str | None = None
        problem: str | None = None
        try:
            st = img.lstat()
            if not stat.S_ISREG(st.st_mode):
                problem = "not a regular file"
            elif st.st_size != d["size"]:
                problem = f"size {st.st_size} bytes, the manifest says {d['size']}"
            else:
                actual = reader.sha256_file(img)
                if actual != d["sha256"]:
                    problem = "checksum mismatch"
        except FileNotFoundError:
            problem = "missing"
        except OSError as exc:
            problem = f"unreadable ({exc.strerror})"
        out.append({"disk": d["name"], "image": str(img), "expected": d["sha256"],
                    "actual": actual, "ok": problem is None, "problem": problem})
    return out


def chain_links(names: Any, path: Path, vm: str,
                d: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """The backups an incremental image needs, the full first, this one last; a full: itself.
    A missing or unreadable link is a BadInput naming it."""
    if (d.get("chain") or {}).get("kind") != "incremental":
        return [(path, d)]
    try:
        return chain.links_of(path, vm, d["name"],
                              lambda p: manifest.locate(names, str(p))[1])
    except (BadInput, ValueError) as exc:
        raise BadInput(f"backup chain of {vm}/{d['name']} ending at {path} is broken: "
                       f"{exc}") from None


def check_chain(names: Any, path: Path, vmrec: dict[str, Any]) -> list[dict[str, Any]]:
    """check_images of every earlier link of each incremental disk (this backup's own images
    are check_images' job)."""
    out = []
    for d in vmrec["disks"]:
        try:
            links = chain_links(names, path, vmrec["name"], d)[:-1]
        except BadInput as exc:
            out.append({"disk": d["name"], "image": str(path), "expected": None, "actual": None,
                        "ok": False, "problem": str(exc)})
            continue
        for p, rec in links:
            out += check_images(p, {"disks": [rec]})
    return out


def apply_increment(image: Path, dev: str, rec: dict[str, Any]) -> int:
    """An incremental image onto a device holding the previous point: its changed ranges
    written (zeros included: a hole in this image is a block that changed to zeros), its
    discarded ranges zeroed. Returns bytes written."""
    written = 0
    src = os.open(image, os.O_RDONLY)
    dst = os.open(dev, os.O_WRONLY)
    try:
        for off, length in rec["chain"]["changed_ranges"]:
            for at in range(off, off + length, 4 << 20):
                n = min(4 << 20, off + length - at)
                written += os.pwrite(dst, os.pread(src, n, at).ljust(n, b"\0"), at)
        for off, length in rec["chain"]["discarded_ranges"]:
            for at in range(off, off + length, 4 << 20):
                n = min(4 << 20, off + length - at)
                written += os.pwrite(dst, bytes(n), at)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return written


def image_problems(checks: list[dict[str, Any]]) -> str:
    """One line: which images are bad and why."""
    return "; ".join(f"{c['image']}: {c['problem']}" for c in checks if not c["ok"])


def restore_disks(lab: Lab, path: Path, vmrec: dict[str, Any], as_name: str,
                  run_id: str, extra_tags: tuple[str, ...] = ()) -> list[str]:
    """Thin LVs `<as_name>_<disk>` written from the images; returns the LV names."""
    names, lvm = lab.names, lab.lvm
    made: list[str] = []
    try:
        for d in vmrec["disks"]:
            lv = names.lv(as_name, d["name"])
            tags = [names.tag, ROLE_TAG["B"], f"vm_{as_name}", f"disk_{d['name']}",
                    f"run_{run_id}", *extra_tags]
            lvm("lvcreate", "-q", "-V", f"{d['size']}b", "-T", f"{names.vg}/{names.pool}",
                "-n", lv, *[x for t in tags for x in ("--addtag", t)])
            made.append(lv)
            dev = f"/dev/mapper/{names.dm_lv_name(lv)}"
            wait_node(dev)
            (first, full), *later = chain_links(names, path, vmrec["name"], d)
            reader.write_image(first / str(full["image"]), dev, int(full["block_bytes"]))
            for p, rec in later:  # the incrementals, oldest first
                apply_increment(p / str(rec["image"]), dev, rec)
    except BaseException:
        for lv in reversed(made):
            lvm("lvremove", "-q", "-y", f"{names.vg}/{lv}", check=False)
        raise
    return made


def restore(lab_name: str, backup: str, as_name: str, vm: str | None = None) -> dict[str, Any]:
    check_name("VM", as_name)
    lab = Lab.open(lab_name)
    names = lab.names
    path, man = manifest.locate(names, backup)
    if man["lab"] != lab.name:
        raise BadInput(f"backup {backup} belongs to lab {man['lab']!r}, not {lab.name!r}")
    vmrec = _pick_vm(man, vm)
    if any(v.name == as_name for v in lab.state.definition.vms):
        raise BadInput(f"{as_name!r} is a VM of this lab: restore onto a new name")
    existing = set(lab.lvs())
    for d in vmrec["disks"]:
        if names.lv(as_name, d["name"]) in existing or dm.devices_with_prefix(
                names.ctl(as_name, d["name"])):
            raise BadInput(f"{as_name!r} already exists in lab {lab.name} "
                           f"({names.lv(as_name, d['name'])})")
    checks = check_images(path, vmrec) + check_chain(names, path, vmrec)
    if not all(c["ok"] for c in checks):
        raise HvlabError(f"backup {path} is damaged, nothing restored: {image_problems(checks)}")
    made = restore_disks(lab, path, vmrec, as_name, man["run"], ("restored",))
    ctls = []
    try:
        for d in vmrec["disks"]:
            ctl = names.ctl(as_name, d["name"])
            dm.create_linear(ctl, names.lv_path(names.lv(as_name, d["name"])),
                             uuid=names.ctl_uuid(as_name, d["name"]))
            ctls.append(ctl)
            wait_node(f"/dev/mapper/{ctl}")
    except BaseException:
        for c in ctls:
            dm.remove(c)
        for lv in made:
            lab.lvm("lvremove", "-q", "-y", f"{names.vg}/{lv}", check=False)
        raise
    rec = {"name": as_name, "from": str(path), "run": man["run"], "vm": vmrec["name"],
           "lvs": made, "controllers": [f"/dev/mapper/{c}" for c in ctls],
           "consistency": vmrec["consistency"], "created": time.time()}
    (names.dir / "restores").mkdir(exist_ok=True)
    write_json_atomic(names.dir / "restores" / f"{as_name}.json", rec)
    return rec


def verify(lab_name: str, backup: str) -> dict[str, Any]:
    """Checksums; then per VM: restore to temporary LVs, fsck -n, mount read-only, ledger
    check; the temporary LVs are removed whatever happens."""
    lab = Lab.open(lab_name)
    names, lvm = lab.names, lab.lvm
    path, man = manifest.locate(names, backup)
    report: dict[str, Any] = {"backup": str(path), "run": man["run"], "vms": [], "ok": True}
    for vmrec in man["vms"]:
        cls = vmrec["consistency"]
        r: dict[str, Any] = {"vm": vmrec["name"], "consistency": cls,
                             "checksums": check_images(path, vmrec)
                             + check_chain(names, path, vmrec), "disks": []}
        report["vms"].append(r)
        if not all(c["ok"] for c in r["checksums"]):
            r["ok"] = report["ok"] = False  # a damaged image is not restored nor mounted
            continue
        tmp = "vfy" + secrets.token_hex(3)
        made: list[str] = []
        mounted: list[Path] = []
        base = names.dir / "verify" / tmp
        try:
            made = restore_disks(lab, path, vmrec, tmp, man["run"], ("verify",))
            roots: dict[str, Path] = {}
            for d in vmrec["disks"]:
                lv = names.lv(tmp, d["name"])
                lvm("lvchange", "-q", "-pr", f"{names.vg}/{lv}")
                dev = f"/dev/mapper/{names.dm_lv_name(lv)}"
                fsck = fs.fsck_readonly(dev, d["fs"])
                disk: dict[str, Any] = {"disk": d["name"], "fs": d["fs"],
                                        "fsck_clean": fsck.returncode == 0,
                                        "fsck": (fsck.stdout + fsck.stderr).strip()[-300:]}
                mp = base / d["name"]
                try:
                    fs.mount(dev, mp, d["fs"], read_only=True)
                    mounted.append(mp)
                    roots[d["name"]] = mp
                    disk["mounted_ro"] = True
                except HvlabError as exc:
                    disk["mounted_ro"] = False
                    disk["mount_error"] = str(exc)
                r["disks"].append(disk)
            if len(roots) == len(vmrec["disks"]):
                res = ledger.check(roots)
                r["ledger"] = res.to_dict()
            else:
                r["ledger"] = None
        finally:
            for mp in reversed(mounted):
                fs.umount(mp)
            for lv in made:
                lvm("lvremove", "-q", "-y", f"{names.vg}/{lv}", check=False)
            with contextlib.suppress(OSError):
                for p in sorted(base.glob("*"), reverse=True):
                    p.rmdir()
                base.rmdir()
        fs_ok = all(d["fsck_clean"] and d["mounted_ro"] for d in r["disks"])
        app_ok = bool(r["ledger"] and r["ledger"]["consistent"])
        # What each class promises: application -> all; filesystem -> fs; crash -> checksums.
        r["ok"] = {"application-consistent": fs_ok and app_ok,
                   "filesystem-consistent": fs_ok}.get(cls, True)
        report["ok"] = report["ok"] and r["ok"]
    try:
        private.write_text(path / "verify.json", json.dumps(report, indent=2))
    except OSError as exc:  # a read-only backup is still verifiable
        report["report_not_saved"] = str(exc)
    return report
