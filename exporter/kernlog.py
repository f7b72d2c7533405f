"""Every kernel-line format the NVIDIA drivers print about GPU health, parsed into `KernelLine`s.

Pure functions over message text: the journal follower feeds them, and tests/data/kernel-lines.txt
holds the published lines each pattern is held to. Formats (sources in that file):

- `NVRM: Xid (PCI:0000:01:00): 79, pid=…, name=…, text`: the current form; `(PCI:dddd:bb:dd.f)` too.
- `NVRM: Xid (0000:01:00): 13, …` (before `PCI:`) and `NVRM: Xid (0009:00): 53, …` (bus:device only,
  domain 0): older drivers.
- `NVRM: Xid (PCI:0000:01:00 GPU-I:05 GPU-CI:01): 94, …`: a MIG GPU; attributed to the GPU, instance kept.
- `NVRM: GPU 0000:01:00.0: GPU has fallen off the bus.` and `NVRM: The NVIDIA GPU 0000:b3:00.0 (PCI ID: …)
  installed in this system has fallen off the bus …` (one record, or three: the first names the GPU):
  no Xid, counted as Xid 79 (the history de-duplicates it against the Xid 79 line of the same event).
- `nvidia-nvswitchN: SXid (PCI:0000:c3:00.0): 20009, Non-fatal, Link 28 …`: NVSwitch errors.
- `GPU reset executed: GPU-…, success: true`: the reset acknowledgement (NVSentinel's reset job logs it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PciKey = tuple[int, int, int]  # (domain, bus, device)

_HEX = r"[0-9a-fA-F]+"
# Xid lines: the address with or without `PCI:`, three or two parts, an optional function, MIG suffixes.
_XID = re.compile(
    rf"NVRM: Xid \((?:PCI:)?(?P<addr>{_HEX}:{_HEX}(?::{_HEX})?)(?:\.[0-7])?"
    r"(?: GPU-I:(?P<gi>\d+))?(?: GPU-CI:(?P<ci>\d+))?\): (?P<code>\d+)(?:,\s*|\s+|$)(?P<text>.*)")
_PROCESS = re.compile(r"^pid=(?P<pid>'<unknown>'|\d+)(?:, name=(?P<name>[^,]*))?,\s*")
_LOCATION = re.compile(r"\(GPC (?P<gpc>\d+), TPC (?P<tpc>\d+)(?:, SM (?P<sm>\d+))?\)")
# Xid 144-150 (NVLink5): unit, severity, XC/instance, link, then intrinfo, error status and more registers.
_NVLINK5 = re.compile(r"^(?P<unit>[A-Z][A-Z0-9_/]*) (?P<severity>Fatal|Nonfatal) XC(?P<xc>\d+) i(?P<inst>\d+) "
                      r"Link (?P<link>-?\d+) \((?P<intrinfo>0x[0-9a-fA-F]{8}) (?P<status>0x[0-9a-fA-F]{8})"
                      r"(?: 0x[0-9a-fA-F]{8})+\)")
_OFF_BUS_GPU = re.compile(rf"NVRM: GPU (?:at )?(?:PCI:)?(?P<addr>{_HEX}:{_HEX}:{_HEX})(?:\.[0-7])?: "
                          r"GPU has fallen off the bus")
_OFF_BUS_NAMED = re.compile(rf"NVRM: The NVIDIA GPU (?P<addr>{_HEX}:{_HEX}:{_HEX})(?:\.[0-7])?")
_OFF_BUS_MIDDLE = re.compile(r"\(PCI ID: [0-9a-fA-F:]+\) installed in this system has\s*$")
_OFF_BUS_TAIL = re.compile(r"fallen off the bus and is not\s+responding to commands")
_SXID = re.compile(rf"nvidia-nvswitch(?P<switch>\d+): SXid \(PCI:(?P<addr>{_HEX}:{_HEX}:{_HEX})(?:\.[0-7])?\): "
                   r"(?P<code>\d+),\s*(?:(?P<severity>Non-fatal|Fatal),\s*)?(?P<text>.*)", re.S)
_LINK = re.compile(r"\bLink (?P<link>-?\d+)")
_RESET = re.compile(r"GPU reset executed: (?P<uuid>GPU-[0-9a-fA-F-]+)(?:, success: (?P<ok>true|false))?")

NVLINK5_XIDS = range(144, 151)


@dataclass(frozen=True)
class KernelLine:
    kind: str  # xid | fell_off_bus | sxid | reset
    code: int = 0  # the Xid (79 for fell_off_bus) or SXid
    pci: PciKey | None = None
    text: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # what the line carries beyond the code
    uuid: str = ""  # reset: the GPU it names


def pci_key(address: str) -> PciKey | None:
    """'0000:3b:00', '00000000:3B:00.0' -> (domain, bus, device); the old 'bb:dd' form -> (0, bus, device)."""
    parts = address.split(".")[0].split(":")
    if len(parts) == 2:
        parts = ["0", *parts]
    if len(parts) != 3:
        return None
    try:
        domain, bus, device = (int(p, 16) for p in parts)
    except ValueError:
        return None
    return domain, bus, device


def pci_text(key: PciKey) -> str:
    return "{:08x}:{:02x}:{:02x}.0".format(*key)


def xid_fields(code: int, text: str) -> dict[str, str]:
    """What an Xid line's text carries: the process, Xid 13's GPC/TPC/SM, Xid 144-150's unit and link."""
    out: dict[str, str] = {}
    if m := _PROCESS.match(text):
        out["pid"] = m["pid"].strip("'")
        if m["name"] is not None:
            out["process"] = m["name"]
        text = text[m.end():]
    if code == 13 and (m := _LOCATION.search(text)):
        out.update({k: v for k, v in m.groupdict().items() if v is not None})
    if code in NVLINK5_XIDS and (m := _NVLINK5.match(text)):
        out.update(unit=m["unit"], severity=m["severity"].lower(), link=m["link"],
                   intrinfo=m["intrinfo"], error_status=m["status"])
    return out


def location(code: int, text: str) -> str:
    """'GPC 7, TPC 7' for an Xid 13 that says where it happened, else ''."""
    f = xid_fields(code, text) if code == 13 else {}
    return f"GPC {f['gpc']}, TPC {f['tpc']}" if "gpc" in f else ""


class LineParser:
    """Parses one kernel message at a time. It keeps one piece of state: the GPU the driver's
    three-record 'has fallen off the bus' message named in its first record."""

    def __init__(self) -> None:
        self._named: PciKey | None = None

    def parse(self, message: str) -> KernelLine | None:
        named, self._named = self._named, None
        if "NVRM: Xid" in message:
            return _xid(message)
        if "SXid" in message:
            return _sxid(message)
        if "fallen off the bus" in message:
            return _off_bus(message, named)
        if m := _OFF_BUS_NAMED.search(message):
            self._named = pci_key(m["addr"])  # the next records may say what happened to it
            return None
        if named is not None and _OFF_BUS_MIDDLE.search(message):
            self._named = named
            return None
        if "GPU reset executed" in message and (m := _RESET.search(message)):
            ok = m["ok"]
            return KernelLine("reset", uuid=m["uuid"], text=message.strip(),
                              fields={"success": ok} if ok else {})
        return None


def parse(message: str) -> KernelLine | None:
    """One self-contained message (the stateless form of LineParser.parse)."""
    return LineParser().parse(message)


def _xid(message: str) -> KernelLine | None:
    found = list(_XID.finditer(message))  # several lines in one message: the last Xid
    m = found[-1] if found else None
    if m is None or (key := pci_key(m["addr"])) is None:
        return None
    code, text = int(m["code"]), " ".join(m["text"].split())
    fields = xid_fields(code, text)
    if m["gi"] is not None:
        fields["gpu_instance"] = str(int(m["gi"]))
    if m["ci"] is not None:
        fields["compute_instance"] = str(int(m["ci"]))
    return KernelLine("xid", code, key, text, fields)


def _sxid(message: str) -> KernelLine | None:
    m = _SXID.search(message)
    if m is None or (key := pci_key(m["addr"])) is None:
        return None
    text = " ".join(m["text"].split())
    fields = {"switch": m["switch"]}
    if m["severity"]:
        fields["severity"] = m["severity"].lower()
    if link := _LINK.search(text):
        fields["link"] = link["link"]
    return KernelLine("sxid", int(m["code"]), key, text, fields)


def _off_bus(message: str, named: PciKey | None) -> KernelLine | None:
    text = " ".join(message.replace("NVRM:", " ").split())
    if m := _OFF_BUS_GPU.search(message):
        return KernelLine("fell_off_bus", 79, pci_key(m["addr"]), text)
    if _OFF_BUS_TAIL.search(" ".join(message.replace("NVRM:", " ").split())):
        m = _OFF_BUS_NAMED.search(message)
        key = pci_key(m["addr"]) if m else named
        if key is not None:
            return KernelLine("fell_off_bus", 79, key, text)
    return None
