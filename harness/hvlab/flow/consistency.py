"""The consistency class a backup's disk gets, by the guest's profile and whether it answered."""

from __future__ import annotations

APP = "application-consistent"
FS = "filesystem-consistent"
CRASH = "crash-consistent"


def consistency_for(profile: str, answers: bool) -> str:
    """The class a disk gets: windows -> application, linux -> filesystem, else crash."""
    if not answers or profile == "none":
        return CRASH
    return APP if profile == "windows" else FS
