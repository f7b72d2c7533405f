"""The Xid catalog, as data: every code NVIDIA documents, what it means and what to do about it.

Each code belongs to exactly one tier; a tier fixes the severity and the default action, and the alert
rules select Xids by tier. Sources: NVIDIA's Xid catalog (immediate-action buckets for A100/H100/B100/
GB200; tests/data/nvidia-xid-catalog.tsv is the table the tests hold this one to) and the repeat rules
used in practice (NVIDIA Fleet Intelligence's 3-minute bursts, NVSentinel; docs/xid-catalog.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CATEGORIES = ("application", "memory", "nvlink", "pcie_bus", "firmware", "power_thermal", "hardware",
              "informational")
SEVERITIES = ("ok", "info", "warning", "critical")

# Recommended actions, weakest first: when several are due, the later one wins.
ACTIONS = ("none", "restart_app", "check_cooling", "check_power", "check_nvlink", "drain_p2p", "reset_gpu",
           "drain_and_reset", "reboot_node", "rma_eval", "contact_support")

# tier -> (severity, default action, what the tier means)
TIERS: dict[str, tuple[str, str, str]] = {
    "reset": ("critical", "reset_gpu", "the GPU must be reset before it runs work again"),
    "double_bit_ecc": ("critical", "drain_and_reset", "uncorrectable memory error"),
    "fell_off_bus": ("critical", "reboot_node", "the GPU is gone from the PCIe bus"),
    "nvlink": ("critical", "check_nvlink", "NVLink error"),
    "mechanical": ("critical", "check_power", "a board power or connector problem"),
    "contained": ("warning", "restart_app", "contained memory error: the app died, the GPU keeps working"),
    "watch": ("warning", "rma_eval", "a hardware trend worth a look"),
    "unexpected": ("warning", "contact_support", "a code not expected on current GPUs"),
    "application": ("info", "restart_app", "usually the application's fault; matters when it repeats"),
    "informational": ("info", "none", "no action"),
}


@dataclass(frozen=True)
class Xid:
    code: int
    name: str
    category: str
    tier: str
    nvidia_action: str  # NVIDIA's immediate-action bucket
    action_override: str = ""

    @property
    def severity(self) -> str:
        return TIERS[self.tier][0]

    @property
    def action(self) -> str:
        return self.action_override or TIERS[self.tier][1]


def _codes(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


# codes | name | category | tier | NVIDIA immediate action | action override
_TABLE = """
8 | FIFO_ERROR_IDLE_TIMEOUT | application | application | RESTART_APP |
11 | GR_ERROR_MISSING_HW | application | application | RESTART_APP |
13 | GR_EXCEPTION | application | application | RESTART_APP |
14 | FAKE_ERROR | informational | informational | IGNORE |
25 | GR_ILLEGAL_NOTIFY | application | application | RESTART_APP |
31 | FIFO_ERROR_MMU_ERR_FLT | application | application | RESTART_APP |
32 | PBDMA_ERROR | pcie_bus | watch | RESTART_APP |
37 | FECS_ERR_UNIMP_FIRMWARE_METHOD | firmware | informational | IGNORE |
38 | FECS_ERR_WATCHDOG_TIMEOUT | firmware | informational | IGNORE |
39-41 | CE_EXCEPTION | hardware | application | RESTART_APP |
43 | RESETCHANNEL_VERIF_ERROR | application | application | IGNORE |
44 | GR_FAULT_DURING_CTXSW | firmware | informational | IGNORE |
45 | PREEMPTIVE_REMOVAL | application | application | WORKFLOW_XID_45 |
46 | GPU_TIMEOUT_ERROR | firmware | reset | RESET_GPU |
48 | GPU_ECC_DBE | memory | double_bit_ecc | WORKFLOW_XID_48 |
54 | SILENT_RUNNING_PWR_REDUCED_CLOCKING | power_thermal | mechanical | CHECK_MECHANICALS |
56 | DISPLAY_CHANNEL_EXCEPTION | hardware | unexpected | CONTACT_SUPPORT |
57 | FB_LINK_TRAINING_FAILURE | hardware | unexpected | CONTACT_SUPPORT |
58 | FB_MEMORY_ERROR | hardware | unexpected | CONTACT_SUPPORT |
60 | SEC2_ERROR | firmware | application | RESTART_APP |
61 | PMU_BREAKPOINT | firmware | unexpected | CONTACT_SUPPORT |
62 | PMU_HALT_ERROR | firmware | reset | RESET_GPU |
63 | INFOROM_DRAM_RETIREMENT_EVENT | memory | informational | IGNORE |
64 | INFOROM_DRAM_RETIREMENT_FAILURE | memory | reset | RESET_GPU | drain_and_reset
65 | NVENC1_ERROR | hardware | unexpected | CONTACT_SUPPORT |
66 | FECS_ERR_REG_ACCESS | firmware | informational | IGNORE |
67 | FECS_ERR_VERIF_VIOLATION | firmware | informational | IGNORE |
68 | NVDEC0_ERROR | hardware | application | RESTART_APP |
69 | GR_CLASS_ERROR | hardware | application | RESTART_APP |
70-72, 75-77 | CE_UNKNOWN_ERROR | hardware | application | RESTART_APP |
73 | NVENC2_ERROR | hardware | unexpected | CONTACT_SUPPORT |
74 | NVLINK_ERROR | nvlink | nvlink | WORKFLOW_NVLINK_ERR |
78 | VGPU_START_ERROR | firmware | informational | UPDATE_SWFW |
79 | GPU_HAS_FALLEN_OFF_THE_BUS | pcie_bus | fell_off_bus | RESTART_BM |
80 | PBDMA_PUSHBUFFER_CRC_MISMATCH | pcie_bus | watch | RESTART_APP |
81 | VGA_SUBSYSTEM_ERROR | hardware | unexpected | CONTACT_SUPPORT |
82-86, 88-89, 96-105 | MEDIA_ENGINE_ERROR | hardware | informational | RESTART_APP |
92 | EXCESSIVE_SBE_INTERRUPTS | memory | watch | IGNORE |
93 | INFOROM_ERASE_LIMIT_EXCEEDED | firmware | informational | IGNORE |
94 | CONTAINED_ERROR | memory | contained | RESTART_APP |
95 | UNCONTAINED_ERROR | memory | reset | RESET_GPU | drain_and_reset
106-107 | SMBPBI_TEST_MESSAGE | informational | informational | IGNORE |
108 | NVLINK_REMOTE_TRANSLATION | nvlink | informational | IGNORE |
109 | CTXSW_TIMEOUT_ERROR | firmware | reset | RESET_GPU |
110 | SEC_FAULT_ERROR | hardware | reset | RESET_GPU |
119 | GSP_RPC_TIMEOUT | firmware | reset | RESET_GPU |
120 | GSP_ERROR | firmware | reset | RESET_GPU |
121 | C2C_ERROR | nvlink | watch | IGNORE | reset_gpu
122-123 | SPI_PMU_RPC_FAIL | firmware | unexpected | CONTACT_SUPPORT |
124 | SPI_PMU_RPC_ERASE_FAIL | firmware | unexpected | CONTACT_SUPPORT |
125 | INFOROM_FS_ERROR | firmware | unexpected | CONTACT_SUPPORT |
126-135 | CE_EXCEPTION | hardware | application | RESTART_APP |
136 | ALI_TRAINING_FAIL | nvlink | reset | RESET_GPU |
137 | NVLINK_PRIV_ERR | application | application | IGNORE |
140 | UNRECOVERABLE_ECC_ERROR_ESCAPE | memory | reset | RESET_GPU | drain_and_reset
141 | FAST_PATH_ERROR | informational | informational | IGNORE |
143 | GPU_INIT_ERROR | hardware | reset | RESET_GPU |
144 | NVLINK_SAW_ERROR | nvlink | nvlink | WORKFLOW_NVLINK5_ERR |
145 | NVLINK_RLW_ERROR | nvlink | nvlink | WORKFLOW_NVLINK5_ERR |
146 | NVLINK_TLW_ERROR | nvlink | nvlink | WORKFLOW_NVLINK5_ERR |
147 | NVLINK_TREX_ERROR | nvlink | nvlink | WORKFLOW_NVLINK5_ERR | contact_support
148 | NVLINK_NVLPW_CTRL_ERROR | nvlink | nvlink | WORKFLOW_NVLINK5_ERR |
149 | NVLINK_NETIR_ERROR | nvlink | nvlink | WORKFLOW_NVLINK5_ERR |
150 | NVLINK_MSE_ERROR | nvlink | reset | RESET_GPU |
151 | KEY_ROTATION_ERROR | firmware | informational | RESTART_VM |
154 | GPU_RECOVERY_ACTION_CHANGED | informational | informational | XID_154_EVAL |
155 | NVLINK_SW_DEFINED_ERROR | nvlink | reset | RESET_GPU |
156 | RESOURCE_RETIREMENT_EVENT | memory | watch | RESET_GPU | reset_gpu
157 | RESOURCE_RETIREMENT_FAILURE | memory | watch | IGNORE |
158 | GPU_FATAL_TIMEOUT | hardware | reset | RESET_GPU |
159 | CHI_NON_DATA_ERROR | nvlink | informational | CHECK_UVM |
160-161 | CHANNEL_RETIREMENT_EVENT | memory | informational | IGNORE |
162-165 | PSHC_POWER_SMOOTHING | power_thermal | watch | (see catalog) | check_power
166 | NVLINK_SECURE_ERROR | nvlink | informational | (none) |
167 | PCIE_FATAL_TIMEOUT | pcie_bus | fell_off_bus | (none) |
168 | REDUCED_GPU_MEMORY_CAPACITY | memory | watch | (none) | contact_support
169 | SEC2_HALT_ERROR | firmware | reset | (none) |
170 | NVLINK_SECURE_ERROR | nvlink | informational | (none) |
171 | UNCORRECTABLE_DRAM_ERROR | memory | double_bit_ecc | (as 48) |
172 | UNCORRECTABLE_SRAM_ERROR | memory | double_bit_ecc | (as 48) | rma_eval
1-7, 9-10, 12, 15-24, 26-30, 33-36, 42, 47 | UNUSED | hardware | unexpected | CONTACT_SUPPORT |
49-53, 55, 59, 87, 90-91, 111-118, 138 | UNUSED | hardware | unexpected | CONTACT_SUPPORT |
"""


def _load(table: str) -> dict[int, Xid]:
    catalog: dict[int, Xid] = {}
    for line in table.strip().splitlines():
        codes, name, category, tier, nvidia, override = (f.strip() for f in line.split("|"))
        assert category in CATEGORIES and tier in TIERS and (not override or override in ACTIONS), line
        for code in _codes(codes):
            assert code not in catalog, f"Xid {code} listed twice"
            catalog[code] = Xid(code, name, category, tier, nvidia, override)
    return catalog


CATALOG: dict[int, Xid] = _load(_TABLE)


def lookup(code: int) -> Xid:
    """Codes NVIDIA has not documented are treated as unexpected: worth a support case, not a page."""
    return CATALOG.get(code) or Xid(code, "UNKNOWN", "hardware", "unexpected", "CONTACT_SUPPORT")


def tier_codes(*tiers: str) -> list[int]:
    return sorted(c for c, x in CATALOG.items() if x.tier in tiers)


@dataclass(frozen=True)
class RepeatRule:
    """Escalation when Xids recur on one GPU, counted in bursts (3 minutes of silence ends a burst)."""

    name: str
    codes: frozenset[int]
    bursts: int
    window_seconds: float
    severity: str
    action: str
    reason: str
    same_location: bool = False  # count only bursts at one GPC/TPC (Xid 13 lines say where)


BURST_GAP_SECONDS = 180.0
DAY = 86400.0
_FATAL = frozenset(tier_codes("reset", "double_bit_ecc", "fell_off_bus", "nvlink")) - {31, 45}

REPEAT_RULES: tuple[RepeatRule, ...] = (
    RepeatRule("xid31_repeating", frozenset({31}), 2, DAY, "warning", "rma_eval",
               "MMU faults (Xid 31) in 2 bursts within 24 h on this GPU: run DCGM diagnostics, then field diag"),
    RepeatRule("xid13_repeating", frozenset({13}), 2, DAY, "warning", "rma_eval",
               "graphics exceptions (Xid 13) in 2 bursts within 24 h on the same GPC/TPC of this GPU: "
               "run DCGM diagnostics", same_location=True),
    RepeatRule("reset_class_recurring", frozenset(tier_codes("reset")), 3, DAY, "critical", "rma_eval",
               "reset-class Xids in 3 bursts within 24 h: resets are not fixing this GPU; evaluate for RMA"),
    RepeatRule("fatal_recurring", _FATAL, 5, DAY, "critical", "contact_support",
               "fatal Xids in 5 bursts within 24 h on this GPU: contact support"),
)


def count_bursts(timestamps: Iterable[float]) -> int:
    bursts, last = 0, None
    for t in sorted(timestamps):
        if last is None or t - last > BURST_GAP_SECONDS:
            bursts += 1
        last = t
    return bursts


def render_markdown() -> str:
    """docs/xid-catalog.md (`python -m nvml_exporter.xidcatalog`)."""
    lines = ["# Xid catalog", "",
             "Generated from `exporter/xidcatalog.py` by `python -m nvml_exporter.xidcatalog`; "
             "do not edit by hand.", "",
             "| tier | severity | default action | meaning |", "|---|---|---|---|"]
    lines += [f"| {t} | {sev} | {act} | {text} |" for t, (sev, act, text) in TIERS.items()]
    lines += ["", "| Xid | name | category | tier | severity | action | NVIDIA immediate action |",
              "|---:|---|---|---|---|---|---|"]
    lines += [f"| {x.code} | {x.name} | {x.category} | {x.tier} | {x.severity} | {x.action} | {x.nvidia_action} |"
              for x in sorted(CATALOG.values(), key=lambda x: x.code)]
    lines += ["", "Repeat rules (bursts end after 3 minutes of silence; they count the incident history across "
              "boots too; a rule on the same GPC/TPC counts Xid 13s by the location their kernel lines name, "
              "or all of them where no line names one):", "",
              "| rule | Xids | bursts | window | severity | action |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {', '.join(map(str, sorted(r.codes)))} | {r.bursts} | {r.window_seconds / 3600:g} h "
              f"| {r.severity} | {r.action} |" for r in REPEAT_RULES]
    lines += ["", "A code not in this table is treated as `unexpected` (warning, contact_support)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_markdown())
