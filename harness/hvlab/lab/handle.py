"""A lab opened by name: its names, state and LVM wrapper, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from hvlab.errors import BadInput
from hvlab.lab.paths import Names, refuse_links_in_lab
from hvlab.lab.state import State
from hvlab.sys.lvm import Lvm, LvRow


@dataclass
class Lab:
    names: Names
    state: State
    lvm: Lvm

    @staticmethod
    def open(name: str) -> Lab:
        """The lab, which must be up: one line naming the lab otherwise. A symlink planted in
        its folder (a runs folder elsewhere, say) is refused before anything is written."""
        names = Names(name)
        refuse_links_in_lab(names)
        st = State.load(name)
        if st is None or st.phase != "up":
            raise BadInput(f"lab {name!r} is not up (`hvlab up` first)")
        return Lab(names, st, names.lvm())

    @property
    def name(self) -> str:
        return self.names.lab

    def lvs(self) -> dict[str, LvRow]:
        return self.lvm.lvs(self.names.vg)
