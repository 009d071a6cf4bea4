"""Off-host mode's pure parts: the link's names and addresses, which runs own leftovers, the
proxy's reads over NBD (a stand-in handle), the explain line and the bench's ratio."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from hvlab.backup import offhost, proxy
from hvlab.backup.thinmeta import CHUNK, Mapping
from hvlab.bench.report import OFFHOST_GOAL, offhost_summary
from hvlab.lab import links
from hvlab.lab.paths import Names
from hvlab.report.explain import link_line
from hvlab.sys import netns


def test_plan_names_fit_and_addresses_are_link_local_on_one_pair() -> None:
    a = links.plan(Names("lab1"), "r20261130070248ba58")
    b = links.plan(Names("lab1"), "r20261130070248ba59")
    for ln in (a, b):
        assert len(ln.lab.ifname) <= 15 and len(ln.proxy.ifname) <= 15  # IFNAMSIZ - 1
        lab, prx = (ipaddress.ip_address(e.address) for e in (ln.lab, ln.proxy))
        assert lab.is_link_local and prx.is_link_local
        net = ipaddress.ip_network(f"{ln.lab.address}/30", strict=False)
        assert prx in net and lab != prx and lab not in (net.network_address,
                                                         net.broadcast_address)
        assert ln.lab.ns.startswith(Names("lab1").netns_prefix) and ln.port == 10809
        assert ln.alias == ln.lab.ns.removesuffix("_lab") == ln.proxy.ns.removesuffix("_proxy")
    assert a.lab.ns != b.lab.ns and a.lab.ifname != b.lab.ifname
    assert links.plan(Names("lab1"), "r1") == links.plan(Names("lab1"), "r1")  # by name alone


def test_runs_with_links_from_namespaces_and_stray_veths(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    n = Names("lab1")
    p = n.netns_prefix
    monkeypatch.setattr(netns, "names", lambda: [
        f"{p}r1_lab", f"{p}r1_proxy", f"{p}r2_proxy", "hvlab_lab12_net_r9_lab", "other"])
    monkeypatch.setattr(netns, "stray_links",
                        lambda prefix: {"hvxl": f"{p}r3"} if prefix == p else {})
    assert links.runs_with_links(n) == {"r1", "r2", "r3"}  # not lab12's, not a stranger's


class _Handle:
    """libnbd's pread over a byte string, counting the requests."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, []  # type: ignore[var-annotated]

    def pread(self, count: int, off: int) -> bytes:
        self.calls.append((off, count))
        return self.data[off:off + count]


def test_proxy_reads_exactly_the_mapped_ranges_in_chunks() -> None:
    pytest.importorskip("nbd")  # Debian's binding, linked into the venv by provision.sh
    bs = 1 << 20
    data = bytes(range(256)) * (40 * bs // 256)
    m = Mapping(dev_id=1, block_bytes=bs, ranges=[(0, 1), (3, 6), (30, 2)], pairs=[])
    h, counted = _Handle(data), [0]
    got = list(proxy._chunks(h, "vm01_disk0", m, counted))
    assert [o for o, _ in got] == [0, 3 * bs, 3 * bs + CHUNK, 30 * bs]
    assert all(d == data[o:o + len(d)] for o, d in got)
    assert counted[0] == sum(len(d) for _, d in got) == 9 * bs == m.mapped_blocks * bs
    assert max(c for _, c in h.calls) <= CHUNK


def test_proxy_says_where_a_read_failed() -> None:
    nbd = pytest.importorskip("nbd")

    class Broken(_Handle):
        def pread(self, count: int, off: int) -> bytes:
            raise nbd.Error("server went away", 5)

    m = Mapping(dev_id=1, block_bytes=1 << 16, ranges=[(2, 1)], pairs=[])
    with pytest.raises(OSError, match=r"reading export d at byte 131072 over NBD") as e:
        list(proxy._chunks(Broken(b""), "d", m, [0]))
    assert e.value.errno == 5


def _link(**extra: Any) -> dict[str, Any]:
    return {"proxy": {"namespace": "hvlab_x_net_r1_proxy", "address": "169.254.7.2"},
            "server": {"namespace": "hvlab_x_net_r1_lab", "address": "169.254.7.1",
                       "port": 10809}, **extra}


def test_link_line() -> None:
    done = link_line(_link(nbd_bytes=6 << 20, mapped_bytes=6 << 20, extents=4,
                           link_bytes=7 << 20))
    assert "169.254.7.2" in done and "169.254.7.1:10809" in done
    assert "6.0 MiB over NBD for the 6.0 MiB it was handed" in done
    assert "in 4 extents, 7.0 MiB on the link" in done
    assert "did not finish" in link_line(_link())


def test_server_read_bytes_from_nbdkit_stats() -> None:
    stats = ("total: 6 ops, 1.067645 s, 20.12 MiB, 18.84 MiB/s\n"
             "read: 6 ops, 0.008617 s, 20.12 MiB, 2.28 GiB/s op, 18.84 MiB/s total\n"
             "  Request size and alignment breakdown:\n")
    assert offhost.server_read_bytes(stats) == round(20.12 * 2**20)
    assert offhost.server_read_bytes("read: 1 ops, 0.1 s, 512 B, 5 KiB/s op\n") == 512
    assert offhost.server_read_bytes("total: 0 ops\n") is None


def test_offhost_ratio() -> None:
    s = offhost_summary(100 << 20, [1.0, 1.0, 1.2], [1.25, 1.25, 2.0])
    assert s["ratio"] == pytest.approx(0.8) and s["goal"] == OFFHOST_GOAL
    assert s["MiB_s"] == pytest.approx(80.0)
