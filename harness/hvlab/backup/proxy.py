"""The off-host proxy: `python -m hvlab.backup.proxy`, run inside the proxy's namespace.

It is handed the allocation map of each disk (taken from the pool's metadata by the storage
side, as Veeam's proxy is handed change-tracking data) and reads only those ranges over NBD
with libnbd, writing the same sparse images as an on-host read. It speaks lines on stdout:
`progress N`, `image {json}` per disk, `done {json}` at the end, or `error {json}`.
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from hvlab.backup.reader import write_chunks
from hvlab.backup.thinmeta import CHUNK, Mapping


def _say(kind: str, what: Any) -> None:
    sys.stdout.write(f"{kind} {json.dumps(what) if not isinstance(what, int) else what}\n")
    sys.stdout.flush()


def _chunks(h: Any, export: str, m: Mapping, counted: list[int]) -> Iterator[tuple[int, bytes]]:
    import nbd

    for first, n in m.ranges:
        off, end = first * m.block_bytes, (first + n) * m.block_bytes
        while off < end:
            count = min(CHUNK, end - off)
            try:
                data = h.pread(count, off)
            except nbd.Error as exc:  # say where, as the on-host reader does
                raise OSError(exc.errnum or errno.EIO, f"{exc.string} reading export {export} "
                              f"at byte {off} over NBD") from None
            counted[0] += len(data)
            yield off, data
            off += count


def main() -> int:
    import nbd

    job = json.load(sys.stdin)
    counted = [0]
    try:
        for disk in job["disks"]:
            h = nbd.NBD()
            h.set_export_name(disk["export"])
            h.connect_tcp(job["address"], str(job["port"]))
            try:
                m = Mapping(dev_id=disk["dev_id"], block_bytes=disk["block_bytes"],
                            ranges=[(a, b) for a, b in disk["ranges"]], pairs=[])
                res = write_chunks(_chunks(h, disk["export"], m, counted), m, disk["size"],
                                   Path(disk["dest"]), lambda n: _say("progress", n))
            finally:
                with suppress(nbd.Error):  # the server is gone: the read's error says so
                    h.shutdown()
            _say("image", {"export": disk["export"], **res})
    except OSError as exc:
        _say("error", {"errno": exc.errno or errno.EIO, "message": str(exc.strerror or exc)})
        return 1
    except nbd.Error as exc:
        _say("error", {"errno": exc.errnum or errno.EIO,
                       "message": f"{exc.string} (NBD server {job['address']}:{job['port']})"})
        return 1
    _say("done", {"nbd_bytes": counted[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
