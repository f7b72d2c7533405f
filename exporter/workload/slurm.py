"""Slurm job-mapping files (`--collect.workload.slurm-dir`), read again only when they change.

A file per GPU, one job per line:
- named by the GPU's NVML index `N`, or `N.<gpu-instance>` for a MIG instance: dcgm-exporter's
  contract, one job id per line;
- named by the GPU's UUID (`GPU-…`, or `MIG-…` for a MIG instance), which the prolog in
  packaging/slurm writes: Slurm's GRES index need not be NVML's index, a UUID is unambiguous. A line
  may carry `key=value` words after the job id: user, account, partition.

    12345 user=alice account=physics partition=gpu

Blank lines and lines starting with `#` are skipped; files of other names (the prolog's temporary
`.…` files among them) are ignored.
"""

from __future__ import annotations

import logging
import os
import re

from . import Reading, SourceError, Workload, merge

log = logging.getLogger("nvml_exporter.workload.slurm")

_INDEX = re.compile(r"^(\d+)(?:\.(\d+))?$")
_UUID = re.compile(r"^(?:GPU|MIG)-[0-9A-Za-z/-]+$")
_JOB = re.compile(r"^[0-9A-Za-z_.+-]{1,64}$")  # 123, array 123_4, het job 123+0, step 123.0
_KEYS = {"user": "slurm_user", "account": "slurm_account", "partition": "slurm_partition"}


def parse_line(line: str) -> Workload | None:
    """One line of a mapping file -> the job; None for a blank or comment line. Raises ValueError."""
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    job = words[0]
    if not _JOB.match(job):
        raise ValueError(f"not a job id: {job!r}")
    labels = []
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"want user=, account= or partition=, got {word!r}")
        labels.append((_KEYS[key], value))
    return Workload(job, "slurm", tuple(sorted(labels)))


class SlurmDir:
    name = "slurm"

    def __init__(self, path: str, interval: float = 1.0):
        self.path = path
        self.interval = interval  # a stat of the directory and its files; the files are read on change only
        self._signature: tuple[object, ...] | None = None

    def _scan(self) -> tuple[tuple[object, ...], list[str]]:
        try:
            st = os.stat(self.path)
            with os.scandir(self.path) as it:
                entries = sorted((e.name, e.stat()) for e in it if not e.name.startswith("."))
        except FileNotFoundError:
            # Before the first job the prolog has not made the directory yet (it lives under /run): no
            # jobs, not an error. A path that is not a directory, or not readable, is one.
            if self._signature != ("absent",):
                log.info("no Slurm job directory (yet): no jobs", extra={"path": self.path})
            return ("absent",), []
        except OSError as e:
            self._signature = None
            raise SourceError(f"cannot read {self.path}: {e.strerror}") from None
        signature = (st.st_mtime_ns, st.st_ino,
                     *((n, s.st_mtime_ns, s.st_size, s.st_ino) for n, s in entries))
        return signature, [n for n, _ in entries]

    def read(self) -> Reading | None:
        signature, names = self._scan()
        if signature == self._signature:
            return None
        pairs: list[tuple[str, Workload]] = []
        problems: list[str] = []
        for name in names:
            if (m := _INDEX.match(name)) is not None:
                key = f"index:{int(m[1])}"
            elif _UUID.match(name):
                key = f"uuid:{name}"
            else:
                continue
            try:
                with open(os.path.join(self.path, name), encoding="utf-8") as f:
                    text = f.read(65536)
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"{name}: {getattr(e, 'strerror', None) or e}")
                continue
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    w = parse_line(line)
                except ValueError as e:
                    problems.append(f"{name}:{number}: {e}")
                    continue
                if w is not None:
                    pairs.append((key, w))
        if problems:
            # What could be read is kept; the signature is not, so the files are read again next time.
            self._signature = None
            raise SourceError("; ".join(problems), merge(pairs))
        self._signature = signature
        return merge(pairs)
