"""dm-ioctl 4.x's wire format, pure: struct dm_ioctl and its payloads, packed and unpacked as
linux/include/uapi/linux/dm-ioctl.h lays them out (dmioctl.py sends them). No device needed:
unit tests check every layout against bytes written by hand."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hvlab.errors import HvlabError

MAPPER = Path("/dev/mapper")  # where a device's node is
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
# padding, dev, name[128], uuid[129], data[7]. Native byte order, no implicit padding: 312 bytes.
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]; params follow.
SPEC = struct.Struct("=QQiI16s")
NAME_LEN, UUID_LEN, TYPE_LEN = 128, 129, 16
VERSION = (4, 0, 0)  # the oldest 4.x we speak; the kernel answers with its own

# Commands (the enum in dm-ioctl.h).
VERSION_CMD, LIST_DEVICES, DEV_CREATE, DEV_REMOVE = 0, 2, 3, 4
DEV_SUSPEND, DEV_STATUS, TABLE_LOAD, TABLE_CLEAR, TABLE_STATUS = 6, 7, 9, 10, 12
LIST_VERSIONS, TARGET_MSG = 13, 14
QUERIES = frozenset({VERSION_CMD, LIST_DEVICES, DEV_STATUS, TABLE_STATUS, LIST_VERSIONS})

# Flags.
READONLY = 1 << 0
SUSPEND = 1 << 1
STATUS_TABLE = 1 << 4
ACTIVE_PRESENT = 1 << 5
INACTIVE_PRESENT = 1 << 6
BUFFER_FULL = 1 << 8
SKIP_LOCKFS = 1 << 10
NOFLUSH = 1 << 11
QUERY_INACTIVE_TABLE = 1 << 12
UUID = 1 << 14
DATA_OUT = 1 << 16
NAME_LIST_HAS_UUID = 1

OUT_BUFFER = 16 << 10  # first try for commands that answer with data; doubled when full
MAX_BUFFER = 16 << 20


def request_code(cmd: int) -> int:
    """_IOWR(0xfd, cmd, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | cmd


def align8(n: int) -> int:
    return (n + 7) & ~7


def decode_dev(dev: int) -> tuple[int, int]:
    """The kernel's huge_encode_dev (new_encode_dev) -> (major, minor)."""
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def encode_dev(major: int, minor: int) -> int:
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


class DmError(HvlabError):
    """A device-mapper ioctl failed: what, on which device, and the kernel's errno."""

    def __init__(self, op: str, name: str, err: int, detail: str = "") -> None:
        self.op, self.name, self.errno = op, name, err
        code = errno.errorcode.get(err, str(err))
        hint = {errno.ENXIO: "no such device",
                errno.EBUSY: "device is in use",
                errno.EEXIST: "already exists",
                errno.EINVAL: "refused by the kernel (its log says why)"}.get(err, "")
        super().__init__(detail or (f"device-mapper {op} of {name or '(none)'} failed: "
                                    f"{os.strerror(err)} ({code}){': ' + hint if hint else ''}"))


class SuspendTimeout(DmError):
    """A suspend did not complete in time: the I/O in flight below the device does not.
    (dm.SuspendTimeout is this class.)"""


@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    event_nr: int
    dev: int
    name: str
    uuid: str


@dataclass(frozen=True)
class Target:
    """One line of a table (or of a status): sectors, target type, its parameters."""

    start: int
    length: int
    type: str
    params: str = ""

    @property
    def line(self) -> str:
        """As `dmsetup table` prints it."""
        return f"{self.start} {self.length} {self.type} {self.params}".rstrip()

    @classmethod
    def parse(cls, line: str) -> Target:
        start, length, ttype, *rest = line.split(maxsplit=3)
        return cls(int(start), int(length), ttype, rest[0].strip() if rest else "")


@dataclass(frozen=True)
class NameEntry:
    """A row of DM_LIST_DEVICES. uuid is None when the kernel does not say (older than 5.13)."""

    name: str
    dev: int
    event_nr: int
    uuid: str | None


@dataclass(frozen=True)
class Info:
    """DM_DEV_STATUS of one device (dmsetup info)."""

    name: str
    uuid: str
    major: int
    minor: int
    open_count: int
    target_count: int
    event_nr: int
    flags: int

    @property
    def suspended(self) -> bool:
        return bool(self.flags & SUSPEND)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & READONLY)

    @property
    def live_table(self) -> bool:
        return bool(self.flags & ACTIVE_PRESENT)

    @property
    def inactive_table(self) -> bool:
        return bool(self.flags & INACTIVE_PRESENT)

    @property
    def devno(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def path(self) -> str:
        return str(MAPPER / self.name)


# ------------------------------------------------------------------------ packing (pure)
def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


def _cstr_at(buf: bytes | bytearray, at: int) -> str:
    """The NUL-terminated string at offset `at` (to the end of buf when unterminated)."""
    end = buf.find(b"\0", at)
    return bytes(buf[at:end if end >= 0 else len(buf)]).decode()


def _fixed(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size or b"\0" in raw:
        raise DmError("request", text[:40], errno.EINVAL,
                      f"device-mapper {what} {text[:40]!r}... is longer than {size - 1} bytes"
                      if len(raw) >= size else f"device-mapper {what} {text!r} contains NUL")
    return raw


def pack_request(name: str = "", uuid: str = "", *, flags: int = 0, payload: bytes = b"",
                 target_count: int = 0, dev: int = 0, out_size: int = 0) -> bytearray:
    """struct dm_ioctl followed by payload, in a buffer of at least out_size bytes of data
    (for the commands that answer with data)."""
    start = HEADER.size  # 312: already 8-aligned, where the kernel puts its answers too
    size = start + max(len(payload), out_size)
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, *VERSION, size, start, target_count, 0, flags, 0, 0, dev,
                     _fixed(name, NAME_LEN, "name"), _fixed(uuid, UUID_LEN, "uuid"), b"")
    buf[start:start + len(payload)] = payload
    return buf


def unpack_header(buf: bytes | bytearray) -> Header:
    (v0, v1, v2, data_size, data_start, target_count, open_count, flags, event_nr, _pad, dev,
     name, uuid, _data) = HEADER.unpack_from(buf, 0)
    return Header((v0, v1, v2), data_size, data_start, target_count, open_count, flags,
                  event_nr, dev, _cstr(name), _cstr(uuid))


def pack_targets(targets: Sequence[Target]) -> bytes:
    """dm_target_spec + NUL-terminated params, each padded to 8 bytes; `next` counts from the
    start of this spec to the start of the next one (the load direction)."""
    out = bytearray()
    for t in targets:
        ttype = t.type.encode()
        if not ttype or len(ttype) >= TYPE_LEN or b"\0" in ttype:
            raise DmError("table load", "", errno.EINVAL,
                          f"device-mapper target type {t.type!r}: 1 to {TYPE_LEN - 1} bytes")
        params = t.params.encode()
        if b"\0" in params:
            raise DmError("table load", "", errno.EINVAL,
                          f"device-mapper target params {t.params!r} contain NUL")
        params += b"\0" * (align8(len(params) + 1) - len(params))
        out += SPEC.pack(t.start, t.length, 0, SPEC.size + len(params), ttype) + params
    return bytes(out)


def unpack_targets(buf: bytes | bytearray, data_start: int, count: int) -> list[Target]:
    """The answer of DM_TABLE_STATUS: `next` counts from the start of the data."""
    out: list[Target] = []
    off = 0
    for _ in range(count):
        at = data_start + off
        start, length, _status, nxt, ttype = SPEC.unpack_from(buf, at)
        params = _cstr_at(buf, at + SPEC.size)
        out.append(Target(start, length, _cstr(ttype), params))
        off = nxt
    return out


def unpack_names(buf: bytes | bytearray, data_start: int, data_size: int) -> list[NameEntry]:
    """The answer of DM_LIST_DEVICES: struct dm_name_list records (dev, next, name), each name
    followed, at the next 8-byte boundary, by event_nr, flags and (flag 1) the uuid."""
    if data_size <= data_start:
        return []
    out: list[NameEntry] = []
    at = data_start
    while True:
        dev, nxt = struct.unpack_from("=QI", buf, at)
        if dev == 0 and not out:
            return []  # "flags no data": the kernel found no device
        name = _cstr_at(buf, at + 12)
        extra = align8(at + 12 + len(name.encode()) + 1)
        event_nr, flags = struct.unpack_from("=II", buf, extra)
        uuid: str | None = None
        if flags & NAME_LIST_HAS_UUID:
            uuid = _cstr_at(buf, extra + 8)
        elif flags:
            uuid = ""  # DOESNT_HAVE_UUID
        out.append(NameEntry(name, dev, event_nr, uuid))
        if nxt == 0:
            return out
        at += nxt


def unpack_versions(buf: bytes | bytearray, data_start: int,
                    data_size: int) -> dict[str, tuple[int, int, int]]:
    """The answer of DM_LIST_VERSIONS: struct dm_target_versions records (next, version[3],
    name), `next` counting from the start of this record to the next one; 0 ends the list."""
    out: dict[str, tuple[int, int, int]] = {}
    at = data_start
    while data_size >= at + 16:
        nxt, v0, v1, v2 = struct.unpack_from("=4I", buf, at)
        out[_cstr_at(buf, at + 16)] = (v0, v1, v2)
        if nxt == 0:
            break
        at += nxt
    return out


def pack_message(text: str, sector: int = 0) -> bytes:
    """struct dm_target_msg: the sector that picks the target, then the NUL-terminated text."""
    raw = text.encode()
    if not raw.strip() or b"\0" in raw:
        raise DmError("message", "", errno.EINVAL, f"device-mapper message {text!r}: empty or NUL")
    return struct.pack("=Q", sector) + raw + b"\0"


def info_of(h: Header) -> Info:
    major, minor = decode_dev(h.dev)
    return Info(h.name, h.uuid, major, minor, h.open_count, h.target_count, h.event_nr, h.flags)
