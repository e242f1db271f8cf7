"""Linux capability names LinuxKit accepts, and its ``all`` / ``none`` shorthands.

LinuxKit checks names against a fixed list (config.go ``allCaps``) and expands a list that is
exactly ``[all]`` or ``[none]`` (any case). We keep the same list, plus the three capabilities
Linux added since (5.8/5.9: CAP_PERFMON, CAP_BPF, CAP_CHECKPOINT_RESTORE), which runc knows too.
"""

from __future__ import annotations

ALL_CAPS: tuple[str, ...] = (
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_AUDIT_WRITE",
    "CAP_BLOCK_SUSPEND",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_PERFMON",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYSLOG",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_NICE",
    "CAP_SYS_PACCT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
)
_KNOWN = frozenset(ALL_CAPS)


def expand(caps: list[str]) -> list[str]:
    """``[all]`` -> every capability, ``[none]`` -> nothing, anything else unchanged (order kept)."""
    if len(caps) == 1:
        word = caps[0].lower()
        if word == "all":
            return list(ALL_CAPS)
        if word == "none":
            return []
    return list(caps)


def unknown(caps: list[str]) -> list[str]:
    """Names in ``caps`` (after expansion) that are not capabilities, in order.

    Names must be written as LinuxKit and runc write them: upper case with the ``CAP_`` prefix.
    """
    return [c for c in expand(caps) if c not in _KNOWN]


def is_shorthand(caps: list[str]) -> bool:
    return len(caps) == 1 and caps[0].lower() in ("all", "none")
