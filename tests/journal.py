"""Real journal files, written offline by systemd-journal-remote from the journal export format."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")


def xid_line(pci: str, code: int, text: str) -> str:
    """A kernel line in the driver's format, e.g. pci '0000:53:00'."""
    return f"NVRM: Xid (PCI:{pci}): {code}, pid='<unknown>', name=<unknown>, {text}"


def write_journal(path: Path, messages: list[tuple[float, str]], identifier: str = "") -> Path:
    """Kernel-transport entries of this boot at the given Unix times (syslog ones from `identifier` where
    given, as `logger -t` writes them); returns the .journal file."""
    assert JOURNAL_REMOTE.exists(), "systemd-journal-remote is not installed: run `make test`, which installs it"
    boot = boot_id()
    records = []
    for i, (ts, message) in enumerate(messages):
        records.append(
            f"__CURSOR=s={i}\n__REALTIME_TIMESTAMP={int(ts * 1e6)}\n"
            f"__MONOTONIC_TIMESTAMP={int(time.monotonic() * 1e6)}\n_BOOT_ID={boot}\n"
            f"_TRANSPORT={'syslog' if identifier else 'kernel'}\n"
            f"SYSLOG_IDENTIFIER={identifier or 'kernel'}\nPRIORITY=4\nMESSAGE={message}\n\n"
        )
    subprocess.run([str(JOURNAL_REMOTE), "-o", str(path), "-"], input="".join(records).encode(), check=True,
                   capture_output=True)
    return path
