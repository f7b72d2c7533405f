"""The one package that talks to NVML (through pynvml); everything it returns is plain data.

- `errors`: what NVML's return codes mean (lost GPU, stale library, never-supported) and the exceptions.
- `fields`: the counters read as field values, and `FieldBatch`, one call for a tier's counters.
- `calls`: prebuilt C calls for the fast tier, past pynvml's wrappers.
- `reader`: `GpuReader`, one GPU read in three tiers (static, slow, fast).
- `library`: `Library`, NVML for the process: init, shutdown, driver version, enumeration.
- `devices`: per-GPU questions off the scrape path (processes, MIG devices).
- `events`: the NVML event set and `EventWatcher`, the thread that records Xids.

No module outside this package imports pynvml (tests/test_layout.py).
"""

from .devices import Process, compute_processes, mig_uuids, uuid_of
from .errors import (
    FUNCTION_NOT_FOUND,
    LOST_CODES,
    NOT_SUPPORTED,
    PERMANENT_CODES,
    STALE_CODES,
    ErrorSink,
    GpuLost,
    NvmlError,
    NvmlStale,
    error_name,
    lost_error,
)
from .events import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_UNAVAILABLE,
    EVENT_NAMES,
    EVENT_RECOVERY_ACTION,
    EVENT_XID,
    Event,
    EventSet,
    EventWatcher,
)
from .fields import ECC_FIELD_IDS, FAST_FIELDS, SLOW_FIELDS, Field, FieldBatch, factors, nvlink_fields, scaled
from .library import Library, bindings_version
from .reader import CLOCK_EVENT_REASONS, CLOCKS, MAX_NVLINKS, THRESHOLDS, GpuReader

__all__ = [
    "CLOCKS",
    "CLOCK_EVENT_REASONS",
    "ECC_FIELD_IDS",
    "EVENT_DOUBLE_BIT_ECC",
    "EVENT_GPU_UNAVAILABLE",
    "EVENT_NAMES",
    "EVENT_RECOVERY_ACTION",
    "EVENT_XID",
    "FAST_FIELDS",
    "FUNCTION_NOT_FOUND",
    "LOST_CODES",
    "MAX_NVLINKS",
    "NOT_SUPPORTED",
    "PERMANENT_CODES",
    "SLOW_FIELDS",
    "STALE_CODES",
    "THRESHOLDS",
    "ErrorSink",
    "Event",
    "EventSet",
    "EventWatcher",
    "Field",
    "FieldBatch",
    "GpuLost",
    "GpuReader",
    "Library",
    "NvmlError",
    "NvmlStale",
    "Process",
    "bindings_version",
    "compute_processes",
    "error_name",
    "factors",
    "lost_error",
    "mig_uuids",
    "nvlink_fields",
    "scaled",
    "uuid_of",
]
