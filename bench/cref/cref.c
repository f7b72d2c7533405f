/* cref: the C floor that `make bench` holds nvml-exporter's collect + render against.
 *
 * It makes the NVML calls the exporter makes, in the exporter's three tiers (exporter/nvml/reader.py):
 *   static, once: identity, maximum clocks and PCIe link, fan count, NVLink ports;
 *   slow, at start and every -s seconds (the exporter's --collect.slow-interval): thresholds, default
 *     power limit, persistence and ECC mode, and one field-values batch of aggregates and retirement;
 *   fast, every collection: the one-number getters, utilization, memory, clock-event reasons, the
 *     process count, and one field-values batch per GPU (memory temperature, energy, PCIe replays,
 *     volatile ECC, clock-event durations, recovery action, and five fields per NVLink port).
 * Each collection renders the per-GPU families of the metric contract (exporter/metrics.py), with
 * the contract's names, types and labels, as Prometheus text into one buffer with snprintf. A symbol
 * the library lacks, or a call that does not answer success, leaves its series out, as the exporter does.
 *
 * It is single-threaded on purpose: it measures the CPU work of a collection, not its latency. The
 * figure to hold against it is the exporter's own collect + render CPU over the same scenario, in the
 * same run (bench/collect_render.py), as a ratio: a scrape also pays for HTTP, which this does not do.
 * It loads libnvidia-ml.so.1 with dlopen, so it runs over the real driver or over tests/fakenvml.
 *
 *   cref [-n COLLECTIONS] [-o PAGE_FILE] [-s SLOW_SECONDS]
 *
 * prints one JSON line: gpus, iterations, cpu_us_per_collection, wall_us_per_collection, bytes (of the
 * last page), nvml_calls_per_collection (the calls the timed collections made, slow tier included).
 * The structs below are this file's own declarations of the NVML ABI (x86-64 layouts, nvml.h).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int ret_t;
typedef void *dev_t_;
typedef struct { char legacy[16]; unsigned domain, bus, device, id, subsys; char bus_id[32]; } pci_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem_t;
typedef struct { unsigned gpu, memory; } util_t;
typedef union { double d; unsigned ui; unsigned long ul; unsigned long long ull; long long sll; int si;
                unsigned short us; } value_t;
typedef struct { unsigned id, scope; long long ts, latency; int type; ret_t ret; value_t v; } field_t;

#define SUCCESS 0
#define INSUFFICIENT_SIZE 7
#define NO_SYMBOL (-1)
#define GPUS_MAX 64
#define LINKS_MAX 36
#define FANS_MAX 8
#define PAGE_SIZE_MAX (1 << 23)

/* ---------------------------------------------------------------- the library ---------------- */
enum sym { INIT, DRIVER, COUNT, HANDLE, NAME, UUID, SERIAL, VBIOS, PCI, MINOR, MAXCLOCK, MAXGEN, MAXWIDTH,
           NUMFANS, LINKSTATE, THRESHOLD, DEFLIMIT, PERSIST, ECCMODE, TEMP, MARGIN, POWER, LIMIT, FAN, CLOCK, ENC,
           DEC, PSTATE, GEN, WIDTH, UTIL, MEM, EVENTS, THROTTLE, PROCS, FIELDS, NSYM };
static const char *const sym_names[NSYM] = {
  "nvmlInitWithFlags", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount_v2", "nvmlDeviceGetHandleByIndex_v2",
  "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetSerial", "nvmlDeviceGetVbiosVersion",
  "nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetMinorNumber", "nvmlDeviceGetMaxClockInfo",
  "nvmlDeviceGetMaxPcieLinkGeneration", "nvmlDeviceGetMaxPcieLinkWidth", "nvmlDeviceGetNumFans",
  "nvmlDeviceGetNvLinkState", "nvmlDeviceGetTemperatureThreshold", "nvmlDeviceGetPowerManagementDefaultLimit",
  "nvmlDeviceGetPersistenceMode", "nvmlDeviceGetEccMode", "nvmlDeviceGetTemperature",
  "nvmlDeviceGetMarginTemperature", "nvmlDeviceGetPowerUsage",
  "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetFanSpeed_v2", "nvmlDeviceGetClockInfo",
  "nvmlDeviceGetEncoderUtilization", "nvmlDeviceGetDecoderUtilization", "nvmlDeviceGetPerformanceState",
  "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth", "nvmlDeviceGetUtilizationRates",
  "nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetCurrentClocksEventReasons",
  "nvmlDeviceGetCurrentClocksThrottleReasons", "nvmlDeviceGetComputeRunningProcesses_v3",
  "nvmlDeviceGetFieldValues" };
static void *sym[NSYM];
static long ncalls;

/* nv(S, type-of-the-function, args...): the call's return code, NO_SYMBOL where the library lacks it. */
#define nv(s, fn_type, ...) (sym[s] ? (ncalls++, ((fn_type)sym[s])(__VA_ARGS__)) : NO_SYMBOL)
typedef ret_t (*fn_u)(unsigned);
typedef ret_t (*fn_str)(char *, unsigned);
typedef ret_t (*fn_pu)(unsigned *);
typedef ret_t (*fn_handle)(unsigned, dev_t_ *);
typedef ret_t (*fn_d_str)(dev_t_, char *, unsigned);
typedef ret_t (*fn_d_pci)(dev_t_, pci_t *);
typedef ret_t (*fn_d_pu)(dev_t_, unsigned *);
typedef ret_t (*fn_d_pi)(dev_t_, int *);
typedef ret_t (*fn_d_i_pu)(dev_t_, int, unsigned *);
typedef ret_t (*fn_d_u_pu)(dev_t_, unsigned, unsigned *);
typedef ret_t (*fn_d_u_pi)(dev_t_, unsigned, int *);
typedef ret_t (*fn_d_pi_pi)(dev_t_, int *, int *);
typedef ret_t (*fn_d_pu_pu)(dev_t_, unsigned *, unsigned *);
typedef ret_t (*fn_d_util)(dev_t_, util_t *);
typedef ret_t (*fn_d_mem)(dev_t_, mem_t *);
typedef ret_t (*fn_d_pull)(dev_t_, unsigned long long *);
typedef ret_t (*fn_d_procs)(dev_t_, unsigned *, void *);
typedef ret_t (*fn_d_fields)(dev_t_, int, field_t *);
typedef struct { unsigned version; int margin; } margin_t;  /* nvmlMarginTemperature_v1_t */
typedef ret_t (*fn_d_margin)(dev_t_, margin_t *);

/* ---------------------------------------------------------------- the series ----------------- */
/* Every per-GPU series but the NVLink ones has a slot; a family is a run of slots, one per label value. */
/* sparse: a series served only once it has been non-zero (exporter/sparse.py), as on the exporter's page */
typedef struct { const char *name, *type, *help, *label; int n; const char *const *values; int slot, sparse; } family_t;

/* the last two: T.Limit offsets, fields 193/194 of the slow batch */
static const char *const thresholds[] = { "shutdown", "slowdown", "gpu_max", "memory_max", "shutdown_tlimit",
                                          "slowdown_tlimit" };
static const int threshold_kinds[] = { 0, 1, 3, 2 };  /* nvmlTemperatureThresholds_t */
static const char *const fans[] = { "0", "1", "2", "3", "4", "5", "6", "7" };
static const char *const clocks[] = { "sm", "memory" };
static const int clock_kinds[] = { 1, 2 };  /* nvmlClockType_t: SM, MEM (the exporter's CLOCKS) */
static const char *const reasons[] = { "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown",
  "sync_boost", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting" };
static const char *const durations[] = { "power", "thermal", "sync_boost", "board_limit", "low_utilization",
                                         "reliability" };  /* field ids 74..79 */
static const char *const ecc_kinds[] = { "type=\"corrected\",scope=\"volatile\"", "type=\"uncorrected\",scope=\"volatile\"",
  "type=\"corrected\",scope=\"aggregate\"", "type=\"uncorrected\",scope=\"aggregate\"" };  /* field ids 3..6 */
static const char *const retired[] = { "single_bit", "double_bit" };
static const char *const remapped[] = { "correctable", "uncorrectable" };

enum { UP, TEMP_, MEMTEMP, THRESH, MARGIN_, POWER_, LIMIT_, DEFLIMIT_, ENERGY, FANSPEED, CLOCKHZ, CLOCKMAX, UTILR, MEMUTILR,
       ENCR, DECR, MEMTOTAL, MEMUSED, MEMFREE, MEMRES, PSTATE_, PERSIST_, GEN_, MAXGEN_, WIDTH_, MAXWIDTH_, REPLAY,
       EVACTIVE, EVDURATION, ECCEN, ECCERR, RETIRED, RETIREDPEND, REMAPPED, REMAPPEND, REMAPFAIL, RECOVERY, PROCS_,
       NFAM };
#define ONE(n, t, h) { n, t, h, NULL, 1, NULL, 0, 0 }
#define MANY(n, t, h, l, v) { n, t, h, l, (int)(sizeof v / sizeof v[0]), v, 0, 0 }
static family_t fam[NFAM] = {
  [UP] = ONE("nvidia_gpu_up", "gauge", "1 if the GPU answered this collection, 0 if it is lost or failing."),
  [TEMP_] = ONE("nvidia_gpu_temperature_celsius", "gauge", "GPU core temperature."),
  [MEMTEMP] = ONE("nvidia_gpu_memory_temperature_celsius", "gauge", "HBM memory temperature."),
  [THRESH] = MANY("nvidia_gpu_temperature_threshold_celsius", "gauge", "The GPU's own temperature thresholds.",
                  "threshold", thresholds),
  [MARGIN_] = ONE("nvidia_gpu_temperature_margin_celsius", "gauge", "How far the GPU is below its T.Limit."),
  [POWER_] = ONE("nvidia_gpu_power_watts", "gauge", "Power draw."),
  [LIMIT_] = ONE("nvidia_gpu_power_limit_watts", "gauge", "Power limit the driver enforces now."),
  [DEFLIMIT_] = ONE("nvidia_gpu_power_default_limit_watts", "gauge", "Default power limit of the board."),
  [ENERGY] = ONE("nvidia_gpu_energy_joules_total", "counter", "Energy used since the driver was loaded."),
  [FANSPEED] = MANY("nvidia_gpu_fan_speed_ratio", "gauge", "Fan speed as a fraction of its maximum.", "fan", fans),
  [CLOCKHZ] = MANY("nvidia_gpu_clock_hertz", "gauge", "Current clock frequency.", "clock", clocks),
  [CLOCKMAX] = MANY("nvidia_gpu_clock_max_hertz", "gauge", "Maximum clock frequency.", "clock", clocks),
  [UTILR] = ONE("nvidia_gpu_utilization_ratio", "gauge", "Fraction of the last sample period a kernel was running."),
  [MEMUTILR] = ONE("nvidia_gpu_memory_utilization_ratio", "gauge", "Fraction of the period memory was busy."),
  [ENCR] = ONE("nvidia_gpu_encoder_utilization_ratio", "gauge", "Video encoder utilization."),
  [DECR] = ONE("nvidia_gpu_decoder_utilization_ratio", "gauge", "Video decoder utilization."),
  [MEMTOTAL] = ONE("nvidia_gpu_memory_total_bytes", "gauge", "Total device memory."),
  [MEMUSED] = ONE("nvidia_gpu_memory_used_bytes", "gauge", "Device memory used by allocations."),
  [MEMFREE] = ONE("nvidia_gpu_memory_free_bytes", "gauge", "Device memory free."),
  [MEMRES] = ONE("nvidia_gpu_memory_reserved_bytes", "gauge", "Device memory reserved by the driver and firmware."),
  [PSTATE_] = ONE("nvidia_gpu_performance_state", "gauge", "Performance state."),
  [PERSIST_] = ONE("nvidia_gpu_persistence_mode", "gauge", "1 if persistence mode is enabled."),
  [GEN_] = ONE("nvidia_gpu_pcie_link_generation", "gauge", "Current PCIe link generation."),
  [MAXGEN_] = ONE("nvidia_gpu_pcie_link_max_generation", "gauge", "Maximum PCIe link generation of the GPU."),
  [WIDTH_] = ONE("nvidia_gpu_pcie_link_width", "gauge", "Current PCIe link width (lanes)."),
  [MAXWIDTH_] = ONE("nvidia_gpu_pcie_link_max_width", "gauge", "Maximum PCIe link width (lanes)."),
  [REPLAY] = ONE("nvidia_gpu_pcie_replay_errors_total", "counter", "PCIe replays since the driver was loaded."),
  [EVACTIVE] = MANY("nvidia_gpu_clock_event_active", "gauge", "1 while a clock-event reason holds clocks down.",
                    "reason", reasons),
  [EVDURATION] = MANY("nvidia_gpu_clock_event_duration_seconds_total", "counter", "Time clocks were held down.",
                      "reason", durations),
  [ECCEN] = ONE("nvidia_gpu_ecc_enabled", "gauge", "1 if ECC is enabled now."),
  [ECCERR] = MANY("nvidia_gpu_ecc_errors_total", "counter", "ECC errors.", NULL, ecc_kinds),
  [RETIRED] = MANY("nvidia_gpu_retired_pages", "gauge", "Pages retired, by cause.", "cause", retired),
  [RETIREDPEND] = ONE("nvidia_gpu_retired_pages_pending", "gauge", "1 if a page retirement waits for a reset."),
  [REMAPPED] = MANY("nvidia_gpu_remapped_rows", "gauge", "Rows remapped, by cause.", "cause", remapped),
  [REMAPPEND] = ONE("nvidia_gpu_remapped_rows_pending", "gauge", "1 if a row remap waits for a GPU reset."),
  [REMAPFAIL] = ONE("nvidia_gpu_remapped_rows_failed", "gauge", "1 if a row remap failed."),
  [RECOVERY] = ONE("nvidia_gpu_recovery_action", "gauge", "Driver's recovery action."),
  [PROCS_] = ONE("nvidia_gpu_compute_processes", "gauge", "Compute processes running on the GPU."),
};
static int nslots;

/* A field-values entry: id and scope in, the slot (or NVLink series) its value goes to, and a scale. */
enum { LINK_UP = -1, LINK_CRC_FLIT = -2, LINK_REPLAY = -3, LINK_RECOVERY = -4, LINK_CRC_DATA = -5 };
static const char *const link_types[] = { "crc_flit", "replay", "recovery", "crc_data" };
typedef struct { int slot, link; double scale; } target_t;
typedef struct { int n; field_t f[16 + 5 * LINKS_MAX]; target_t to[16 + 5 * LINKS_MAX]; } batch_t;

typedef struct {
  dev_t_ h;
  char labels[128];        /* gpu="0",uuid="GPU-..." */
  char info[768];          /* the nvidia_gpu_info labels */
  unsigned fans, nlinks, links[LINKS_MAX];
  batch_t fast, slow;
  double *val;             /* nslots values */
  unsigned char *ok;       /* whether each value was read */
  unsigned char *shown;    /* a sparse family's series that has been non-zero, served from then on */
  unsigned char link_shown[LINKS_MAX];  /* a link that was down or counted an error: its detail is served */
  double link_val[LINKS_MAX][5];
  unsigned char link_ok[LINKS_MAX][5];
} gpu_t;
static gpu_t gpu[GPUS_MAX];
static unsigned ngpus;
static char driver[80] = "";

static void add(batch_t *b, unsigned id, unsigned scope, int slot, int link, double scale) {
  b->f[b->n] = (field_t){ .id = id, .scope = scope };
  b->to[b->n++] = (target_t){ slot, link, scale };
}

static double field_value(const field_t *f) {
  switch (f->type) {  /* nvmlValueType_t */
    case 0: return f->v.d;
    case 1: return f->v.ui;
    case 2: return (double)f->v.ul;
    case 4: return (double)f->v.sll;
    case 5: return f->v.si;
    case 6: return f->v.us;
    default: return (double)f->v.ull;
  }
}

static void read_batch(gpu_t *g, batch_t *b) {
  if (!b->n) return;
  for (int k = 0; k < b->n; k++) b->f[k].ret = NO_SYMBOL;
  if (nv(FIELDS, fn_d_fields, g->h, b->n, b->f) != SUCCESS) {
    for (int k = 0; k < b->n; k++) b->f[k].ret = NO_SYMBOL;
  }
  for (int k = 0; k < b->n; k++) {
    const target_t *t = &b->to[k];
    int ok = b->f[k].ret == SUCCESS;
    double v = ok ? field_value(&b->f[k]) * t->scale : 0;
    if (t->slot >= 0) { g->ok[t->slot] = (unsigned char)ok; g->val[t->slot] = v; }
    else { g->link_ok[t->link][-t->slot - 1] = (unsigned char)ok; g->link_val[t->link][-t->slot - 1] = v; }
  }
}

/* ------------------------------------------------------------------ the tiers ---------------- */
#define SET(g, s, cond, value) do { int ok_ = (cond); (g)->ok[s] = (unsigned char)ok_; if (ok_) (g)->val[s] = (value); } while (0)

static void read_static(unsigned i) {
  gpu_t *g = &gpu[i];
  char name[96] = "", uuid[96] = "", serial[32] = "", vbios[32] = "", minor_s[16] = "";
  pci_t pci; memset(&pci, 0, sizeof pci);
  unsigned u = 0;
  nv(HANDLE, fn_handle, i, &g->h);
  nv(UUID, fn_d_str, g->h, uuid, sizeof uuid);
  nv(NAME, fn_d_str, g->h, name, sizeof name);
  nv(SERIAL, fn_d_str, g->h, serial, sizeof serial);
  nv(VBIOS, fn_d_str, g->h, vbios, sizeof vbios);
  nv(PCI, fn_d_pci, g->h, &pci);
  if (nv(MINOR, fn_d_pu, g->h, &u) == SUCCESS) snprintf(minor_s, sizeof minor_s, "%u", u);
  snprintf(g->labels, sizeof g->labels, "gpu=\"%u\",uuid=\"%s\"", i, uuid);
  snprintf(g->info, sizeof g->info, "gpu=\"%u\",uuid=\"%s\",name=\"%s\",pci_bus_id=\"%s\",serial=\"%s\",vbios_version=\"%s\","
           "minor_number=\"%s\",driver_version=\"%s\"", i, uuid, name, pci.bus_id, serial, vbios, minor_s, driver);
  g->val = calloc((size_t)nslots, sizeof *g->val);
  g->ok = calloc((size_t)nslots, 1);
  g->shown = calloc((size_t)nslots, 1);
  if (!g->val || !g->ok || !g->shown) { perror("cref"); exit(1); }
  for (int c = 0; c < 2; c++)
    SET(g, fam[CLOCKMAX].slot + c, nv(MAXCLOCK, fn_d_i_pu, g->h, clock_kinds[c], &u) == SUCCESS, u * 1e6);
  SET(g, fam[MAXGEN_].slot, nv(MAXGEN, fn_d_pu, g->h, &u) == SUCCESS, u);
  SET(g, fam[MAXWIDTH_].slot, nv(MAXWIDTH, fn_d_pu, g->h, &u) == SUCCESS, u);
  g->fans = nv(NUMFANS, fn_d_pu, g->h, &u) == SUCCESS ? (u < FANS_MAX ? u : FANS_MAX) : 0;
  for (unsigned l = 0; l < LINKS_MAX; l++) {
    int active;
    if (nv(LINKSTATE, fn_d_u_pi, g->h, l, &active) != SUCCESS) break;
    g->links[g->nlinks++] = l;
  }
  /* the fast batch: GPU-scope fields, then five per NVLink port (crc_data has per-link ids for 0-11 only) */
  add(&g->fast, 82, 0, fam[MEMTEMP].slot, 0, 1);
  add(&g->fast, 83, 0, fam[ENERGY].slot, 0, 1e-3);
  add(&g->fast, 94, 0, fam[REPLAY].slot, 0, 1);
  add(&g->fast, 3, 0, fam[ECCERR].slot, 0, 1);
  add(&g->fast, 4, 0, fam[ECCERR].slot + 1, 0, 1);
  for (int d = 0; d < 6; d++) add(&g->fast, 74 + (unsigned)d, 0, fam[EVDURATION].slot + d, 0, 1e-9);
  add(&g->fast, 230, 0, fam[RECOVERY].slot, 0, 1);
  for (unsigned k = 0; k < g->nlinks; k++) {
    unsigned l = g->links[k];
    add(&g->fast, 165, l, LINK_UP, (int)k, 1);
    add(&g->fast, 163, l, LINK_CRC_FLIT, (int)k, 1);
    add(&g->fast, 161, l, LINK_REPLAY, (int)k, 1);
    add(&g->fast, 162, l, LINK_RECOVERY, (int)k, 1);
    if (l < 6) add(&g->fast, 39 + l, 0, LINK_CRC_DATA, (int)k, 1);
    else if (l < 12) add(&g->fast, 102 + l - 6, 0, LINK_CRC_DATA, (int)k, 1);
  }
  add(&g->slow, 5, 0, fam[ECCERR].slot + 2, 0, 1);
  add(&g->slow, 6, 0, fam[ECCERR].slot + 3, 0, 1);
  add(&g->slow, 29, 0, fam[RETIRED].slot, 0, 1);
  add(&g->slow, 30, 0, fam[RETIRED].slot + 1, 0, 1);
  add(&g->slow, 31, 0, fam[RETIREDPEND].slot, 0, 1);
  add(&g->slow, 142, 0, fam[REMAPPED].slot, 0, 1);
  add(&g->slow, 143, 0, fam[REMAPPED].slot + 1, 0, 1);
  add(&g->slow, 144, 0, fam[REMAPPEND].slot, 0, 1);
  add(&g->slow, 145, 0, fam[REMAPFAIL].slot, 0, 1);
  add(&g->slow, 193, 0, fam[THRESH].slot + 4, 0, 1);
  add(&g->slow, 194, 0, fam[THRESH].slot + 5, 0, 1);
}

static void read_slow(gpu_t *g) {
  unsigned u; int a, b;
  for (int t = 0; t < 4; t++)
    SET(g, fam[THRESH].slot + t, nv(THRESHOLD, fn_d_i_pu, g->h, threshold_kinds[t], &u) == SUCCESS, u);
  SET(g, fam[DEFLIMIT_].slot, nv(DEFLIMIT, fn_d_pu, g->h, &u) == SUCCESS, u * 1e-3);
  SET(g, fam[PERSIST_].slot, nv(PERSIST, fn_d_pi, g->h, &a) == SUCCESS, a);
  SET(g, fam[ECCEN].slot, nv(ECCMODE, fn_d_pi_pi, g->h, &a, &b) == SUCCESS, a);
  read_batch(g, &g->slow);
}

static void read_fast(gpu_t *g) {
  unsigned u, period; int a; util_t ut; mem_t m; unsigned long long mask;
  SET(g, fam[TEMP_].slot, nv(TEMP, fn_d_i_pu, g->h, 0, &u) == SUCCESS, u);
  SET(g, fam[POWER_].slot, nv(POWER, fn_d_pu, g->h, &u) == SUCCESS, u * 1e-3);
  SET(g, fam[LIMIT_].slot, nv(LIMIT, fn_d_pu, g->h, &u) == SUCCESS, u * 1e-3);
  for (unsigned f = 0; f < g->fans; f++)
    SET(g, fam[FANSPEED].slot + (int)f, nv(FAN, fn_d_u_pu, g->h, f, &u) == SUCCESS, u * 0.01);
  for (int c = 0; c < 2; c++)
    SET(g, fam[CLOCKHZ].slot + c, nv(CLOCK, fn_d_i_pu, g->h, clock_kinds[c], &u) == SUCCESS, u * 1e6);
  SET(g, fam[ENCR].slot, nv(ENC, fn_d_pu_pu, g->h, &u, &period) == SUCCESS, u * 0.01);
  SET(g, fam[DECR].slot, nv(DEC, fn_d_pu_pu, g->h, &u, &period) == SUCCESS, u * 0.01);
  SET(g, fam[PSTATE_].slot, nv(PSTATE, fn_d_pi, g->h, &a) == SUCCESS, a);
  SET(g, fam[GEN_].slot, nv(GEN, fn_d_pu, g->h, &u) == SUCCESS, u);
  SET(g, fam[WIDTH_].slot, nv(WIDTH, fn_d_pu, g->h, &u) == SUCCESS, u);
  margin_t mg = { (unsigned)sizeof mg | 1u << 24, 0 };  /* nvmlMarginTemperature_v1 */
  SET(g, fam[MARGIN_].slot, nv(MARGIN, fn_d_margin, g->h, &mg) == SUCCESS, mg.margin);
  int ok = nv(UTIL, fn_d_util, g->h, &ut) == SUCCESS;
  SET(g, fam[UTILR].slot, ok, ut.gpu * 0.01);
  SET(g, fam[MEMUTILR].slot, ok, ut.memory * 0.01);
  m.version = (unsigned)sizeof m | 2u << 24;  /* nvmlMemory_v2 */
  ok = nv(MEM, fn_d_mem, g->h, &m) == SUCCESS;
  SET(g, fam[MEMTOTAL].slot, ok, (double)m.total);
  SET(g, fam[MEMUSED].slot, ok, (double)m.used);
  SET(g, fam[MEMFREE].slot, ok, (double)m.free);
  SET(g, fam[MEMRES].slot, ok, (double)m.reserved);
  /* the "event" name arrived in driver 535; older drivers have the "throttle" one, same ABI */
  ok = (sym[EVENTS] ? nv(EVENTS, fn_d_pull, g->h, &mask) : nv(THROTTLE, fn_d_pull, g->h, &mask)) == SUCCESS;
  for (int r = 0; r < 9; r++) SET(g, fam[EVACTIVE].slot + r, ok, (double)(mask >> r & 1));
  unsigned n = 0;  /* the count alone: the first half of the two-call protocol */
  ret_t pr = nv(PROCS, fn_d_procs, g->h, &n, NULL);
  SET(g, fam[PROCS_].slot, pr == SUCCESS || pr == INSUFFICIENT_SIZE, n);
  read_batch(g, &g->fast);
  g->ok[fam[UP].slot] = 1;
  g->val[fam[UP].slot] = 1;
}

/* ----------------------------------------------------------------- the page ------------------ */
static char page[PAGE_SIZE_MAX];
static size_t used;

static void put(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(page + used, sizeof page - used, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof page - used) { fprintf(stderr, "cref: page over %d bytes\n", PAGE_SIZE_MAX); exit(1); }
  used += (size_t)n;
}

static void header(const char *name, const char *type, const char *help) {
  put("# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Per GPU: links by state and errors summed over links, by type; per link only for a link that was down
 * or counted an error (exporter/sparse.py). The exporter's totals also survive a link going down; over
 * the floor's run no link changes, so a plain sum is the same work. */
static void render_nvlink(void) {
  header("nvidia_gpu_nvlink_links", "gauge", "NVLink links of the GPU by state.");
  for (unsigned i = 0; i < ngpus; i++) {
    unsigned up = 0, down = 0;
    for (unsigned k = 0; k < gpu[i].nlinks; k++)
      if (gpu[i].link_ok[k][0]) { if (gpu[i].link_val[k][0] == 1) up++; else down++; }
    if (up + down == 0) continue;
    put("nvidia_gpu_nvlink_links{%s,state=\"up\"} %u\n", gpu[i].labels, up);
    put("nvidia_gpu_nvlink_links{%s,state=\"down\"} %u\n", gpu[i].labels, down);
  }
  header("nvidia_gpu_nvlink_errors_total", "counter", "NVLink data-link errors of the GPU, summed over its links.");
  for (unsigned i = 0; i < ngpus; i++) {
    gpu_t *g = &gpu[i];
    for (int t = 1; t < 5; t++) {
      double sum = 0; int any = 0;
      for (unsigned k = 0; k < g->nlinks; k++)
        if (g->link_ok[k][t]) { any = 1; sum += g->link_val[k][t]; }
      if (any) put("nvidia_gpu_nvlink_errors_total{%s,type=\"%s\"} %.17g\n", g->labels, link_types[t - 1], sum);
    }
    for (unsigned k = 0; k < g->nlinks; k++) {
      if (g->link_shown[k]) continue;
      int faulty = g->link_ok[k][0] && g->link_val[k][0] != 1;
      for (int t = 1; t < 5; t++) faulty |= g->link_ok[k][t] && g->link_val[k][t] != 0;
      g->link_shown[k] = (unsigned char)faulty;
    }
  }
  header("nvidia_gpu_nvlink_link_up", "gauge", "1 if the NVLink link is active.");
  for (unsigned i = 0; i < ngpus; i++)
    for (unsigned k = 0; k < gpu[i].nlinks; k++)
      if (gpu[i].link_shown[k] && gpu[i].link_ok[k][0])
        put("nvidia_gpu_nvlink_link_up{%s,link=\"%u\"} %.17g\n", gpu[i].labels, gpu[i].links[k], gpu[i].link_val[k][0]);
  header("nvidia_gpu_nvlink_link_errors_total", "counter", "NVLink data-link errors of one link by type.");
  for (unsigned i = 0; i < ngpus; i++)
    for (unsigned k = 0; k < gpu[i].nlinks; k++)
      for (int t = 1; t < 5; t++)
        if (gpu[i].link_shown[k] && gpu[i].link_ok[k][t])
          put("nvidia_gpu_nvlink_link_errors_total{%s,link=\"%u\",type=\"%s\"} %.17g\n", gpu[i].labels,
              gpu[i].links[k], link_types[t - 1], gpu[i].link_val[k][t]);
}

static void render(void) {
  used = 0;
  header("nvidia_gpu_info", "gauge", "GPU identity; always 1.");
  for (unsigned i = 0; i < ngpus; i++) put("nvidia_gpu_info{%s} 1\n", gpu[i].info);
  for (int f = 0; f < NFAM; f++) {
    const family_t *F = &fam[f];
    header(F->name, F->type, F->help);
    for (int k = 0; k < F->n; k++)
      for (unsigned i = 0; i < ngpus; i++) {
        const gpu_t *g = &gpu[i];
        if (!g->ok[F->slot + k]) continue;
        if (F->sparse && !g->shown[F->slot + k]) {
          if (g->val[F->slot + k] == 0) continue;
          g->shown[F->slot + k] = 1;
        }
        if (!F->values) put("%s{%s} %.17g\n", F->name, g->labels, g->val[F->slot]);
        else if (!F->label) put("%s{%s,%s} %.17g\n", F->name, g->labels, F->values[k], g->val[F->slot + k]);
        else put("%s{%s,%s=\"%s\"} %.17g\n", F->name, g->labels, F->label, F->values[k], g->val[F->slot + k]);
      }
    if (f == REMAPFAIL) render_nvlink();  /* the NVLink families come next in the contract's order */
  }
}

/* ----------------------------------------------------------------- main ---------------------- */
static double seconds(clockid_t clock) {
  struct timespec t;
  clock_gettime(clock, &t);
  return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  long n = 1000;
  double slow_every = 30;
  const char *out = NULL;
  for (int opt; (opt = getopt(argc, argv, "n:o:s:")) != -1;) {
    if (opt == 'n' && (n = atol(optarg)) > 0) continue;
    if (opt == 's' && (slow_every = atof(optarg)) > 0) continue;
    if (opt == 'o') { out = optarg; continue; }
    fprintf(stderr, "usage: %s [-n COLLECTIONS > 0] [-o PAGE_FILE] [-s SLOW_SECONDS > 0]\n", argv[0]);
    return 2;
  }
  void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) { fprintf(stderr, "cref: %s\n", dlerror()); return 1; }
  for (int s = 0; s < NSYM; s++) sym[s] = dlsym(lib, sym_names[s]);
  static const int sparse[] = { ENCR, DECR, EVACTIVE, EVDURATION, ECCERR, RETIRED, REMAPPED };
  for (size_t k = 0; k < sizeof sparse / sizeof sparse[0]; k++) fam[sparse[k]].sparse = 1;
  for (int f = 0; f < NFAM; f++) { fam[f].slot = nslots; nslots += fam[f].n; }
  if (nv(INIT, fn_u, 0) != SUCCESS) { fprintf(stderr, "cref: nvmlInitWithFlags failed\n"); return 1; }
  nv(DRIVER, fn_str, driver, sizeof driver);
  if (nv(COUNT, fn_pu, &ngpus) != SUCCESS || ngpus == 0 || ngpus > GPUS_MAX) {
    fprintf(stderr, "cref: no GPUs, or more than %d\n", GPUS_MAX);
    return 1;
  }
  for (unsigned i = 0; i < ngpus; i++) { read_static(i); read_slow(&gpu[i]); read_fast(&gpu[i]); }
  render();  /* a warm-up collection, untimed */

  ncalls = 0;
  double wall0 = seconds(CLOCK_MONOTONIC), cpu0 = seconds(CLOCK_PROCESS_CPUTIME_ID), slow_at = wall0 + slow_every;
  for (long it = 0; it < n; it++) {
    int slow = seconds(CLOCK_MONOTONIC) >= slow_at;
    if (slow) slow_at += slow_every;
    for (unsigned i = 0; i < ngpus; i++) {
      if (slow) read_slow(&gpu[i]);
      read_fast(&gpu[i]);
    }
    render();
  }
  double wall = seconds(CLOCK_MONOTONIC) - wall0, cpu = seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu0;

  if (out) {
    FILE *f = fopen(out, "w");
    if (!f || fwrite(page, 1, used, f) != used || fclose(f) != 0) { perror(out); return 1; }
  }
  printf("{\"gpus\": %u, \"iterations\": %ld, \"cpu_us_per_collection\": %.2f, \"wall_us_per_collection\": %.2f, "
         "\"bytes\": %zu, \"nvml_calls_per_collection\": %.1f}\n",
         ngpus, n, cpu * 1e6 / (double)n, wall * 1e6 / (double)n, used, (double)ncalls / (double)n);
  return 0;
}
