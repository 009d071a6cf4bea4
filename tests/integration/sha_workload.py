"""Beside the register test: threads and processes hash and copy the same data many times
(sha256 and memcpy use the vector units); every digest must be the expected one.

    python sha_workload.py THREADS PROCESSES ROUNDS MIB EXPECTED_SHA256
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading

DATA_SEED = 20


def data(mib: int) -> bytes:
    return random.Random(DATA_SEED).randbytes(mib << 20)


def _work(buf: bytes, rounds: int, expected: str, bad: list[str]) -> None:
    for r in range(rounds):
        copy = bytearray(buf)  # a memcpy of the whole buffer
        digest = hashlib.sha256(copy).hexdigest()
        if digest != expected or copy != buf:
            bad.append(f"round {r}: {digest}")


def _process(threads: int, rounds: int, buf: bytes, expected: str) -> int:
    bad: list[str] = []
    workers = [threading.Thread(target=_work, args=(buf, rounds, expected, bad))
               for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for line in bad[:3]:
        print(f"sha_workload: pid {os.getpid()} MISMATCH {line}", flush=True)
    return 1 if bad else 0


def main() -> int:
    threads, processes, rounds, mib = (int(a) for a in sys.argv[1:5])
    expected = sys.argv[5]
    buf = data(mib)
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            os._exit(_process(threads, rounds, buf, expected))
        children.append(pid)
    rc = _process(threads, rounds, buf, expected)
    for pid in children:
        rc |= os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
    hashed = threads * processes * rounds * mib
    print(f"sha_workload: {threads} threads x {processes} processes x {rounds} rounds of "
          f"{mib} MiB, {hashed} MiB hashed: {'MISMATCH' if rc else 'every digest right'}")
    return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
