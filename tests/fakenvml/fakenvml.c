/* fakenvml.c — a stand-in libnvidia-ml.so.1 for machines without an NVIDIA GPU.
 *
 * pynvml (and any C program) loads it exactly as it loads the driver's library. Every answer comes
 * from one key=value state file ($FAKE_NVML_STATE), re-read whenever the file is replaced, so a test
 * can change the "hardware" under a running exporter. One state key feeds every API that reports it:
 * the temperature getter and field value 82 read the same key, so the two can never disagree.
 * A key that is absent means the board does not support that reading (NVML_ERROR_NOT_SUPPORTED);
 * a value "e:<code>" makes that reading fail with <code>. Keys are documented in README.md.
 *
 * Xid and other events come from an append-only file ($FAKE_NVML_EVENTS, default $FAKE_NVML_STATE.events),
 * one "<gpu> <event-type-mask> <data> [gi ci]" line each, delivered once per event set.
 * Per-symbol call counters live in a shared file ($FAKE_NVML_COUNTERS) so tests can read another
 * process's counts; fakeNvmlCallCount() reads them in-process.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <libgen.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ---- NVML ABI (own declarations, written from the documented x86-64 layouts) ---- */
typedef int nvmlReturn_t;
enum {
  OK = 0, E_UNINITIALIZED = 1, E_INVALID_ARGUMENT = 2, E_NOT_SUPPORTED = 3, E_NOT_FOUND = 6,
  E_INSUFFICIENT_SIZE = 7, E_TIMEOUT = 10, E_FUNCTION_NOT_FOUND = 13, E_GPU_IS_LOST = 15,
  E_ARGUMENT_VERSION_MISMATCH = 25, E_UNKNOWN = 999
};
typedef struct fake_dev { uint32_t magic; int index; } *nvmlDevice_t;
typedef struct { char busIdLegacy[16]; unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
                 char busId[32]; } nvmlPciInfo_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned long long bar1Total, bar1Free, bar1Used; } nvmlBAR1Memory_t;
typedef struct { unsigned gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long referenceTime, violationTime; } nvmlViolationTime_t;
typedef struct { unsigned pid; unsigned long long usedGpuMemory; unsigned gpuInstanceId, computeInstanceId; }
    nvmlProcessInfo_t;
typedef struct { unsigned version; int sensorType; int temperature; } nvmlTemperature_t;
typedef union { double d; unsigned ui; unsigned long ul; unsigned long long ull; long long sll; int si;
                unsigned short us; } nvmlValue_t;
typedef struct { unsigned fieldId, scopeId; long long timestamp, latencyUsec; int valueType;
                 nvmlReturn_t nvmlReturn; nvmlValue_t value; } nvmlFieldValue_t;
typedef struct { nvmlDevice_t device; unsigned long long eventType, eventData; unsigned gpuInstanceId,
                 computeInstanceId; } nvmlEventData_t;
enum { VT_DOUBLE = 0, VT_UINT = 1, VT_ULL = 3, VT_SLL = 4, VT_SINT = 5 };

#define MEMORY_V2_VERSION 0x02000028u
#define TEMPERATURE_V1_VERSION 0x0100000Cu
#define MARGIN_TEMPERATURE_V1_VERSION 0x01000008u /* nvmlMarginTemperature_v1: {unsigned version; int marginTemperature} */
#define MAX_GPUS 64
#define MAX_LINKS 36
#define MAX_PROCS 64
#define DEV_MAGIC 0x4e564d4cu

/* ---- symbols, for call counting and per-symbol error/latency keys ---- */
#define SYMBOLS(X) \
  X(nvmlInit) X(nvmlInit_v2) X(nvmlInitWithFlags) X(nvmlShutdown) X(nvmlErrorString) \
  X(nvmlSystemGetDriverVersion) X(nvmlSystemGetNVMLVersion) X(nvmlSystemGetCudaDriverVersion) \
  X(nvmlSystemGetCudaDriverVersion_v2) X(nvmlDeviceGetCount) X(nvmlDeviceGetCount_v2) \
  X(nvmlDeviceGetHandleByIndex) X(nvmlDeviceGetHandleByIndex_v2) X(nvmlDeviceGetHandleByUUID) \
  X(nvmlDeviceGetHandleByPciBusId_v2) X(nvmlDeviceGetIndex) X(nvmlDeviceGetName) X(nvmlDeviceGetUUID) \
  X(nvmlDeviceGetSerial) X(nvmlDeviceGetPciInfo_v3) X(nvmlDeviceGetMinorNumber) X(nvmlDeviceGetBrand) \
  X(nvmlDeviceGetArchitecture) X(nvmlDeviceGetCudaComputeCapability) X(nvmlDeviceGetVbiosVersion) \
  X(nvmlDeviceGetBoardPartNumber) X(nvmlDeviceGetTemperature) X(nvmlDeviceGetTemperatureV) \
  X(nvmlDeviceGetTemperatureThreshold) X(nvmlDeviceGetMarginTemperature) X(nvmlDeviceGetPowerUsage) X(nvmlDeviceGetPowerManagementLimit) \
  X(nvmlDeviceGetEnforcedPowerLimit) X(nvmlDeviceGetPowerManagementDefaultLimit) \
  X(nvmlDeviceGetPowerManagementLimitConstraints) X(nvmlDeviceGetTotalEnergyConsumption) \
  X(nvmlDeviceGetNumFans) X(nvmlDeviceGetFanSpeed) X(nvmlDeviceGetFanSpeed_v2) X(nvmlDeviceGetClockInfo) \
  X(nvmlDeviceGetMaxClockInfo) X(nvmlDeviceGetUtilizationRates) X(nvmlDeviceGetEncoderUtilization) \
  X(nvmlDeviceGetDecoderUtilization) X(nvmlDeviceGetMemoryInfo) X(nvmlDeviceGetMemoryInfo_v2) \
  X(nvmlDeviceGetBAR1MemoryInfo) X(nvmlDeviceGetPcieReplayCounter) X(nvmlDeviceGetCurrPcieLinkGeneration) \
  X(nvmlDeviceGetCurrPcieLinkWidth) X(nvmlDeviceGetMaxPcieLinkGeneration) X(nvmlDeviceGetMaxPcieLinkWidth) \
  X(nvmlDeviceGetCurrentClocksEventReasons) X(nvmlDeviceGetCurrentClocksThrottleReasons) \
  X(nvmlDeviceGetSupportedClocksEventReasons) X(nvmlDeviceGetSupportedClocksThrottleReasons) \
  X(nvmlDeviceGetViolationStatus) X(nvmlDeviceGetPerformanceState) X(nvmlDeviceGetPowerState) \
  X(nvmlDeviceGetPersistenceMode) X(nvmlDeviceGetComputeMode) X(nvmlDeviceGetEccMode) \
  X(nvmlDeviceGetTotalEccErrors) X(nvmlDeviceGetRetiredPages) X(nvmlDeviceGetRetiredPages_v2) \
  X(nvmlDeviceGetRetiredPagesPendingStatus) X(nvmlDeviceGetRemappedRows) X(nvmlDeviceGetNvLinkState) \
  X(nvmlDeviceGetNvLinkErrorCounter) X(nvmlDeviceGetFieldValues) X(nvmlDeviceGetComputeRunningProcesses_v3) \
  X(nvmlDeviceGetGraphicsRunningProcesses_v3) X(nvmlDeviceGetMigMode) X(nvmlEventSetCreate) \
  X(nvmlDeviceGetSupportedEventTypes) X(nvmlDeviceRegisterEvents) X(nvmlEventSetWait_v2) \
  X(nvmlEventSetWait) X(nvmlEventSetFree) X(nvmlDeviceGetPcieThroughput) X(nvmlDeviceGetProcessUtilization)

#define SYM_ENUM(s) S_##s,
enum { SYMBOLS(SYM_ENUM) NSYMS };
#define SYM_NAME(s) #s,
static const char *sym_names[NSYMS] = { SYMBOLS(SYM_NAME) };

/* ---- call counters: a file of NSYMS records {char name[56]; uint64 count} shared across processes ---- */
typedef struct { char name[56]; uint64_t count; } counter_t;
static counter_t local_counters[NSYMS];
static counter_t *counters = local_counters;
static pthread_once_t counters_once = PTHREAD_ONCE_INIT;

static void counters_init(void) {
  for (int i = 0; i < NSYMS; i++) snprintf(local_counters[i].name, sizeof local_counters[i].name, "%s", sym_names[i]);
  const char *path = getenv("FAKE_NVML_COUNTERS");
  if (!path || !*path) return;
  int fd = open(path, O_RDWR | O_CREAT, 0644);
  if (fd < 0) return;
  size_t size = sizeof(counter_t) * NSYMS;
  if (ftruncate(fd, (off_t)size) == 0) {
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m != MAP_FAILED) {
      counters = m;
      for (int i = 0; i < NSYMS; i++) memcpy(counters[i].name, local_counters[i].name, sizeof counters[i].name);
    }
  }
  close(fd);
}
static void count_call(int sym) {
  pthread_once(&counters_once, counters_init);
  __atomic_fetch_add(&counters[sym].count, 1, __ATOMIC_RELAXED);
}

/* ---- state store: open-addressing hash of key -> value strings ---- */
typedef struct { char *key, *val; } kv_t;
static kv_t *table;
static size_t table_cap;
static char *file_text;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/* A GPU answers one call at a time: the real driver ran field-value calls from 1, 2 and 4 threads on
 * one H200 in the same wall time (docs/hardware/h200-580.159.04.md). Injected latency is waited out
 * holding the GPU's own mutex, so calls on different GPUs still overlap. */
static pthread_mutex_t gpu_busy[MAX_GPUS];
static pthread_once_t gpu_busy_once = PTHREAD_ONCE_INIT;
static void gpu_busy_init(void) { for (int i = 0; i < MAX_GPUS; i++) pthread_mutex_init(&gpu_busy[i], NULL); }
static struct stat loaded_stat;
static char loaded_path[4096];
static int init_refcount;
static struct timespec t_load;
static struct fake_dev devs[MAX_GPUS];

static uint64_t hash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  while (*s) { h ^= (unsigned char)*s++; h *= 1099511628211ull; }
  return h;
}
static const char *lookup(const char *key) {
  if (!table_cap) return NULL;
  for (size_t i = hash(key) & (table_cap - 1);; i = (i + 1) & (table_cap - 1)) {
    if (!table[i].key) return NULL;
    if (strcmp(table[i].key, key) == 0) return table[i].val;
  }
}
static char *trim(char *s) {
  while (isspace((unsigned char)*s)) s++;
  char *e = s + strlen(s);
  while (e > s && isspace((unsigned char)e[-1])) *--e = 0;
  return s;
}
static int field_latency_keys;                /* any latency_us.field.* key: look fields' latency up */
static void parse_state(char *text) {
  int fields_timed = 0;
  size_t lines = 1;
  for (char *p = text; *p; p++) lines += *p == '\n';
  size_t cap = 64;
  while (cap < lines * 2) cap <<= 1;
  kv_t *t = calloc(cap, sizeof *t);
  if (!t) return;
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
    char *hashmark = strchr(line, '#');
    if (hashmark) *hashmark = 0;
    char *eq = strchr(line, '=');
    if (!eq) continue;
    *eq = 0;
    char *k = trim(line), *v = trim(eq + 1);
    if (!*k) continue;
    size_t i = hash(k) & (cap - 1);
    while (t[i].key && strcmp(t[i].key, k) != 0) i = (i + 1) & (cap - 1);
    t[i].key = k; t[i].val = v;               /* a later line overrides an earlier one */
    if (strstr(k, "latency_us.field.")) fields_timed = 1;
  }
  free(table);
  table = t; table_cap = cap;
  field_latency_keys = fields_timed;
}
/* Re-read the state file when it was replaced or changed. Called with the lock held. */
static void reload(int force) {
  const char *path = getenv("FAKE_NVML_STATE");
  if (!path) path = "";
  struct stat st;
  if (stat(path, &st) != 0) memset(&st, 0, sizeof st);
  if (!force && table && strcmp(path, loaded_path) == 0 && st.st_ino == loaded_stat.st_ino &&
      st.st_dev == loaded_stat.st_dev && st.st_size == loaded_stat.st_size &&
      st.st_mtim.tv_sec == loaded_stat.st_mtim.tv_sec && st.st_mtim.tv_nsec == loaded_stat.st_mtim.tv_nsec)
    return;
  char *text = NULL;
  FILE *f = *path ? fopen(path, "r") : NULL;
  if (f) {
    text = calloc(1, (size_t)st.st_size + 1);
    if (text && fread(text, 1, (size_t)st.st_size, f) != (size_t)st.st_size) text[0] = 0;
    fclose(f);
  }
  if (!text) text = calloc(1, 1);
  parse_state(text);
  free(file_text);
  file_text = text;
  loaded_stat = st;
  snprintf(loaded_path, sizeof loaded_path, "%s", path);
  if (!t_load.tv_sec) clock_gettime(CLOCK_MONOTONIC, &t_load);
}

static double since_load(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - t_load.tv_sec) + (double)(now.tv_nsec - t_load.tv_nsec) * 1e-9;
}

/* Parse a numeric value: "e:<code>" is an injected error; "A+R/s" grows by R per second since load. */
static nvmlReturn_t parse_num(const char *v, double *out) {
  if (!v) return E_NOT_SUPPORTED;
  if (v[0] == 'e' && v[1] == ':') return (nvmlReturn_t)strtol(v + 2, NULL, 0);
  char *end;
  double base = (v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) ? (double)strtoull(v, &end, 16) : strtod(v, &end);
  if (end == v) return E_UNKNOWN;
  if (*end == '+') {
    double rate = strtod(end + 1, NULL);
    base += (double)(uint64_t)(rate * since_load());
  }
  *out = base;
  return OK;
}
static const char *gkey(int g, const char *key) {
  char k[160];
  snprintf(k, sizeof k, "gpu.%d.%s", g, key);
  return lookup(k);
}
static nvmlReturn_t get_num(int g, const char *key, double *out) { return parse_num(gkey(g, key), out); }
static nvmlReturn_t get_u32(int g, const char *key, unsigned *out) {
  double d; nvmlReturn_t r = get_num(g, key, &d);
  if (r == OK) *out = (unsigned)(uint64_t)d;
  return r;
}
static nvmlReturn_t get_u64(int g, const char *key, unsigned long long *out) {
  double d; nvmlReturn_t r = get_num(g, key, &d);
  if (r == OK) *out = (unsigned long long)d;
  return r;
}
static long global_long(const char *key, long dflt) {
  const char *v = lookup(key);
  return v ? strtol(v, NULL, 0) : dflt;
}
static int gpu_count(void) {
  long n = global_long("gpu_count", 0);
  return n < 0 ? 0 : n > MAX_GPUS ? MAX_GPUS : (int)n;
}
static int flag(int g, const char *key) { const char *v = gkey(g, key); return v && strtol(v, NULL, 0) != 0; }
/* An absent GPU (gpu.N.absent=1) is unbound from the driver or in the middle of a reset: enumeration skips
 * it (the count drops and the GPUs after it move down an index, as DCGM's nvmlRemoveGpu models), a lookup
 * by UUID or PCI bus id answers NOT_FOUND, and a handle taken before answers GPU_IS_LOST. The state file's
 * N is a slot; NVML's index is the rank among the slots present. */
static int is_absent(int g) { return flag(g, "absent"); }
static int is_lost(int g) { return flag(g, "lost") || is_absent(g); }
static int enum_count(void) {
  int n = 0;
  for (int i = 0; i < gpu_count(); i++) n += !is_absent(i);
  return n;
}
static int slot_of_index(unsigned index) {
  for (int i = 0, rank = 0; i < gpu_count(); i++)
    if (!is_absent(i) && (unsigned)rank++ == index) return i;
  return -1;
}
static int index_of_slot(int g) {
  int rank = 0;
  for (int i = 0; i < g; i++) rank += !is_absent(i);
  return rank;
}
/* A driver reload (driver_epoch changed since this process's nvmlInit): what the process got from NVML
 * before is gone, so every call answers UNINITIALIZED until nvmlInit succeeds again (init_error keeps it
 * failing while the module is out). A real driver cannot unload under an open client; this is what a
 * client that let go and came back, or one whose state went stale, must cope with. */
static long init_epoch;
static int stale_epoch(void) { return global_long("driver_epoch", 0) != init_epoch; }

/* Latency: the most specific of gpu.N.latency_us.<sym>, gpu.N.latency_us, latency_us.<sym>, latency_us. */
static long latency_for(int g, int sym) {
  char k[160]; const char *v;
  if (g >= 0) {
    snprintf(k, sizeof k, "gpu.%d.latency_us.%s", g, sym_names[sym]);
    if ((v = lookup(k))) return strtol(v, NULL, 0);
    snprintf(k, sizeof k, "gpu.%d.latency_us", g);
    if ((v = lookup(k))) return strtol(v, NULL, 0);
  }
  snprintf(k, sizeof k, "latency_us.%s", sym_names[sym]);
  if ((v = lookup(k))) return strtol(v, NULL, 0);
  return global_long("latency_us", 0);
}
/* Injected error for this call: gpu.N.err.<sym> or err.<sym>. */
static nvmlReturn_t injected_error(int g, int sym) {
  char k[160]; const char *v;
  if (g >= 0) {
    snprintf(k, sizeof k, "gpu.%d.err.%s", g, sym_names[sym]);
    if ((v = lookup(k))) return (nvmlReturn_t)strtol(v, NULL, 0);
  }
  snprintf(k, sizeof k, "err.%s", sym_names[sym]);
  if ((v = lookup(k))) return (nvmlReturn_t)strtol(v, NULL, 0);
  return OK;
}

/* Every entry point starts with enter() (takes the lock) and ends with leave() (drops it, then waits
 * out the injected latency, as a slow driver call would). */
static nvmlReturn_t enter(int sym, long *lat) {
  count_call(sym);
  pthread_mutex_lock(&lock);
  reload(0);
  *lat = latency_for(-1, sym);
  if (!init_refcount || stale_epoch()) return E_UNINITIALIZED;
  return injected_error(-1, sym);
}
static nvmlReturn_t enter_dev(int sym, nvmlDevice_t dev, int *g, long *lat) {
  count_call(sym);
  pthread_mutex_lock(&lock);
  reload(0);
  *lat = latency_for(-1, sym);
  if (!init_refcount || stale_epoch()) return E_UNINITIALIZED;
  if (!dev || dev < &devs[0] || dev >= &devs[MAX_GPUS] || dev->magic != DEV_MAGIC) return E_INVALID_ARGUMENT;
  *g = dev->index;
  *lat = latency_for(*g, sym);
  if (*g >= gpu_count()) return E_INVALID_ARGUMENT;
  if (is_lost(*g)) return E_GPU_IS_LOST;
  return injected_error(*g, sym);
}
static nvmlReturn_t leave(nvmlReturn_t r, long lat, int g) {
  pthread_mutex_unlock(&lock);
  if (lat > 0) {
    struct timespec ts = { lat / 1000000, (lat % 1000000) * 1000 };
    if (g >= 0) { pthread_once(&gpu_busy_once, gpu_busy_init); pthread_mutex_lock(&gpu_busy[g]); }
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    if (g >= 0) pthread_mutex_unlock(&gpu_busy[g]);
  }
  return r;
}
#define BEGIN(sym) long lat_ = 0; int g = -1; nvmlReturn_t rc = enter(S_##sym, &lat_); if (rc != OK) goto out;
#define BEGIN_DEV(sym, dev) long lat_ = 0; int g = -1; nvmlReturn_t rc = enter_dev(S_##sym, dev, &g, &lat_); \
  if (rc != OK) goto out;
#define END out: return leave(rc, lat_, g);
#define FAIL(code) do { rc = (code); goto out; } while (0)

static nvmlReturn_t copy_str(const char *s, char *buf, unsigned len) {
  if (!buf) return E_INVALID_ARGUMENT;
  if (strlen(s) + 1 > len) return E_INSUFFICIENT_SIZE;
  memcpy(buf, s, strlen(s) + 1);
  return OK;
}

/* ---- derived identity defaults (a GPU needs nothing in the state file to enumerate) ---- */
static void default_uuid(int g, char *out, size_t n) {
  const char *v = gkey(g, "uuid");
  if (v) snprintf(out, n, "%s", v);
  else snprintf(out, n, "GPU-%08x-fa4e-4e56-8d4c-%012x", 0xfa4e0000u + (unsigned)g, (unsigned)g);
}
static void default_bus_id(int g, char *out, size_t n) {
  const char *v = gkey(g, "bus_id");
  if (v) snprintf(out, n, "%s", v);
  else snprintf(out, n, "00000000:%02X:00.0", 0x18 + g * 0x11);
}

/* ================================ library ================================ */
static const char *error_text(nvmlReturn_t r) {
  switch (r) {
    case 0: return "Success"; case 1: return "Uninitialized"; case 2: return "Invalid Argument";
    case 3: return "Not Supported"; case 4: return "Insufficient Permissions"; case 5: return "Already Initialized";
    case 6: return "Not Found"; case 7: return "Insufficient Size"; case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded"; case 10: return "Timeout"; case 11: return "Interrupt request issue";
    case 12: return "NVML Shared Library Not Found"; case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM"; case 15: return "GPU is lost"; case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch."; case 19: return "In use by another client";
    case 20: return "Insufficient Memory"; case 21: return "No data"; case 22: return "vGPU ECC not supported";
    case 23: return "Insufficient resources"; case 24: return "Frequency not supported";
    case 25: return "Argument version mismatch"; case 26: return "Deprecated"; case 27: return "Not ready";
    case 28: return "GPU not found"; case 29: return "Invalid state";
    default: return "Unknown Error";
  }
}
EXPORT const char *nvmlErrorString(nvmlReturn_t r) { count_call(S_nvmlErrorString); return error_text(r); }

static nvmlReturn_t do_init(int sym) {
  count_call(sym);
  pthread_mutex_lock(&lock);
  reload(0);
  nvmlReturn_t rc = (nvmlReturn_t)global_long("init_error", 0);
  long lat = latency_for(-1, sym);
  if (rc == OK) {
    if (stale_epoch()) init_refcount = 0;     /* the references from before the reload are gone */
    init_epoch = global_long("driver_epoch", 0);
    init_refcount++;
    for (int i = 0; i < MAX_GPUS; i++) { devs[i].magic = DEV_MAGIC; devs[i].index = i; }
  }
  return leave(rc, lat, -1);
}
EXPORT nvmlReturn_t nvmlInit(void) { return do_init(S_nvmlInit); }
EXPORT nvmlReturn_t nvmlInit_v2(void) { return do_init(S_nvmlInit_v2); }
EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned flags) { (void)flags; return do_init(S_nvmlInitWithFlags); }
EXPORT nvmlReturn_t nvmlShutdown(void) {
  BEGIN(nvmlShutdown)
  init_refcount--;
  END
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *buf, unsigned len) {
  BEGIN(nvmlSystemGetDriverVersion)
  const char *v = lookup("driver_version");
  rc = copy_str(v ? v : "550.54.15", buf, len);
  END
}
EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *buf, unsigned len) {
  BEGIN(nvmlSystemGetNVMLVersion)
  const char *v = lookup("nvml_version");
  rc = copy_str(v ? v : "12.550.54.15", buf, len);
  END
}
static nvmlReturn_t cuda_version(int sym, int *out) {
  long lat_ = 0; nvmlReturn_t rc = enter(sym, &lat_);
  if (rc == OK) { if (!out) rc = E_INVALID_ARGUMENT; else *out = (int)global_long("cuda_version", 12040); }
  return leave(rc, lat_, -1);
}
EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { return cuda_version(S_nvmlSystemGetCudaDriverVersion, v); }
EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return cuda_version(S_nvmlSystemGetCudaDriverVersion_v2, v); }

/* ================================ enumeration ================================ */
static nvmlReturn_t get_count(int sym, unsigned *n) {
  long lat_ = 0; nvmlReturn_t rc = enter(sym, &lat_);
  if (rc == OK) { if (!n) rc = E_INVALID_ARGUMENT; else *n = (unsigned)enum_count(); }
  return leave(rc, lat_, -1);
}
EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned *n) { return get_count(S_nvmlDeviceGetCount, n); }
EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *n) { return get_count(S_nvmlDeviceGetCount_v2, n); }

static nvmlReturn_t by_index(int sym, unsigned i, nvmlDevice_t *out) {
  long lat_ = 0; int g = -1; nvmlReturn_t rc = enter(sym, &lat_);
  if (rc != OK) goto out;
  int slot = slot_of_index(i);
  if (!out || slot < 0) FAIL(E_INVALID_ARGUMENT);
  lat_ = latency_for(slot, sym);
  if (is_lost(slot)) FAIL(E_GPU_IS_LOST);
  if ((rc = injected_error(slot, sym)) != OK) goto out;
  *out = &devs[slot];
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned i, nvmlDevice_t *d) { return by_index(S_nvmlDeviceGetHandleByIndex, i, d); }
EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned i, nvmlDevice_t *d) { return by_index(S_nvmlDeviceGetHandleByIndex_v2, i, d); }

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *out) {
  BEGIN(nvmlDeviceGetHandleByUUID)
  if (!uuid || !out) FAIL(E_INVALID_ARGUMENT);
  rc = E_NOT_FOUND;
  for (int i = 0; i < gpu_count(); i++) {
    char u[96];
    default_uuid(i, u, sizeof u);
    if (is_absent(i) || strcmp(u, uuid) != 0) continue;
    if (is_lost(i)) FAIL(E_GPU_IS_LOST);
    *out = &devs[i];
    FAIL(OK);
  }
  END
}
static int bus_id_equal(const char *a, const char *b) {
  /* NVML accepts both "0000:18:00.0" and "00000000:18:00.0": compare from the bus number on. */
  const char *ca = strchr(a, ':'), *cb = strchr(b, ':');
  return ca && cb && strcasecmp(ca, cb) == 0 && strtoul(a, NULL, 16) == strtoul(b, NULL, 16);
}
EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus, nvmlDevice_t *out) {
  BEGIN(nvmlDeviceGetHandleByPciBusId_v2)
  if (!bus || !out) FAIL(E_INVALID_ARGUMENT);
  rc = E_NOT_FOUND;
  for (int i = 0; i < gpu_count(); i++) {
    char b[32];
    default_bus_id(i, b, sizeof b);
    if (is_absent(i) || !bus_id_equal(b, bus)) continue;
    if (is_lost(i)) FAIL(E_GPU_IS_LOST);
    *out = &devs[i];
    FAIL(OK);
  }
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetIndex, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  *out = (unsigned)index_of_slot(g);
  END
}

/* ================================ identity ================================ */
#define STRING_GETTER(sym, key, dflt)                                        \
  EXPORT nvmlReturn_t sym(nvmlDevice_t d, char *buf, unsigned len) {         \
    BEGIN_DEV(sym, d)                                                        \
    const char *v = gkey(g, key);                                            \
    if (!v && !(dflt)) FAIL(E_NOT_SUPPORTED);                                \
    if (v && v[0] == 'e' && v[1] == ':') FAIL((nvmlReturn_t)strtol(v + 2, NULL, 0)); \
    rc = copy_str(v ? v : (dflt), buf, len);                                 \
    END                                                                      \
  }
STRING_GETTER(nvmlDeviceGetName, "name", "NVIDIA Fake GPU")
STRING_GETTER(nvmlDeviceGetSerial, "serial", NULL)
STRING_GETTER(nvmlDeviceGetVbiosVersion, "vbios", NULL)
STRING_GETTER(nvmlDeviceGetBoardPartNumber, "board_part", NULL)

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *buf, unsigned len) {
  BEGIN_DEV(nvmlDeviceGetUUID, d)
  char u[96];
  default_uuid(g, u, sizeof u);
  rc = copy_str(u, buf, len);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
  BEGIN_DEV(nvmlDeviceGetPciInfo_v3, d)
  if (!p) FAIL(E_INVALID_ARGUMENT);
  char b[32];
  default_bus_id(g, b, sizeof b);
  memset(p, 0, sizeof *p);
  snprintf(p->busId, sizeof p->busId, "%s", b);
  unsigned dom = 0, bus = 0, dev = 0, fn = 0;
  sscanf(b, "%x:%x:%x.%x", &dom, &bus, &dev, &fn);
  p->domain = dom; p->bus = bus; p->device = dev;
  snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%04x:%02x:%02x.%x", dom & 0xffff, bus, dev, fn);
  double v;
  p->pciDeviceId = get_num(g, "pci_device_id", &v) == OK ? (unsigned)v : 0x233010DEu;
  p->pciSubSystemId = get_num(g, "pci_subsystem_id", &v) == OK ? (unsigned)v : 0x16C110DEu;
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetMinorNumber, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  if (get_u32(g, "minor", out) == E_NOT_SUPPORTED) *out = (unsigned)g;
  END
}
#define U32_GETTER(sym, key)                                                 \
  EXPORT nvmlReturn_t sym(nvmlDevice_t d, unsigned *out) {                   \
    BEGIN_DEV(sym, d)                                                        \
    if (!out) FAIL(E_INVALID_ARGUMENT);                                      \
    rc = get_u32(g, key, out);                                               \
    END                                                                      \
  }
U32_GETTER(nvmlDeviceGetBrand, "brand")
U32_GETTER(nvmlDeviceGetArchitecture, "arch")
EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t d, int *major, int *minor) {
  BEGIN_DEV(nvmlDeviceGetCudaComputeCapability, d)
  if (!major || !minor) FAIL(E_INVALID_ARGUMENT);
  unsigned ma, mi;
  if ((rc = get_u32(g, "cc_major", &ma)) != OK || (rc = get_u32(g, "cc_minor", &mi)) != OK) goto out;
  *major = (int)ma; *minor = (int)mi;
  END
}

/* ================================ thermal, power ================================ */
EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetTemperature, d)
  if (!out || sensor != 0) FAIL(E_INVALID_ARGUMENT);
  rc = get_u32(g, "temp", out);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t d, nvmlTemperature_t *t) {
  BEGIN_DEV(nvmlDeviceGetTemperatureV, d)
  if (!t || t->sensorType != 0) FAIL(E_INVALID_ARGUMENT);
  if (t->version != TEMPERATURE_V1_VERSION) FAIL(E_ARGUMENT_VERSION_MISMATCH);
  unsigned v;
  if ((rc = get_u32(g, "temp", &v)) == OK) t->temperature = (int)v;
  END
}
static const char *threshold_keys[] = { "threshold.shutdown", "threshold.slowdown", "threshold.mem_max",
                                        "threshold.gpu_max" };
EXPORT nvmlReturn_t nvmlDeviceGetTemperatureThreshold(nvmlDevice_t d, int type, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetTemperatureThreshold, d)
  if (!out || type < 0) FAIL(E_INVALID_ARGUMENT);
  if (type > 3) FAIL(E_NOT_SUPPORTED);
  rc = get_u32(g, threshold_keys[type], out);
  END
}
/* nvml.h: the signed distance, in C, of the GPU temperature below its T.Limit (the max-operating limit):
 * negative past it. A real H200 prints T.Limit 50 C at 37 C with gpu_max 87 C, so by default the fake
 * answers threshold.gpu_max - temp (it follows the temperature); a `margin` key overrides it. */
typedef struct { unsigned version; int marginTemperature; } nvmlMarginTemperature_t;
EXPORT nvmlReturn_t nvmlDeviceGetMarginTemperature(nvmlDevice_t d, nvmlMarginTemperature_t *m) {
  BEGIN_DEV(nvmlDeviceGetMarginTemperature, d)
  if (!m) FAIL(E_INVALID_ARGUMENT);
  if (m->version != MARGIN_TEMPERATURE_V1_VERSION) FAIL(E_ARGUMENT_VERSION_MISMATCH);
  const char *v = gkey(g, "margin");
  if (v) { m->marginTemperature = (int)strtol(v, NULL, 0); rc = OK; }
  else {
    unsigned t, mx;
    if ((rc = get_u32(g, "temp", &t)) == OK && (rc = get_u32(g, "threshold.gpu_max", &mx)) == OK)
      m->marginTemperature = (int)mx - (int)t;
  }
  END
}
U32_GETTER(nvmlDeviceGetPowerUsage, "power_mw")
U32_GETTER(nvmlDeviceGetPowerManagementLimit, "power_limit_mw")
U32_GETTER(nvmlDeviceGetEnforcedPowerLimit, "power_limit_mw")
U32_GETTER(nvmlDeviceGetPowerManagementDefaultLimit, "power_default_mw")
EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t d, unsigned *mn, unsigned *mx) {
  BEGIN_DEV(nvmlDeviceGetPowerManagementLimitConstraints, d)
  if (!mn || !mx) FAIL(E_INVALID_ARGUMENT);
  if ((rc = get_u32(g, "power_min_mw", mn)) == OK) rc = get_u32(g, "power_max_mw", mx);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *out) {
  BEGIN_DEV(nvmlDeviceGetTotalEnergyConsumption, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  rc = get_u64(g, "energy_mj", out);
  END
}
U32_GETTER(nvmlDeviceGetNumFans, "num_fans")
static nvmlReturn_t fan_speed(int g, unsigned fan, unsigned *out) {
  unsigned n;
  nvmlReturn_t rc = get_u32(g, "num_fans", &n);
  if (rc != OK) return rc;
  if (n == 0) return E_NOT_SUPPORTED;                 /* H200: GetNumFans 0, fan speed N/A */
  if (fan >= n) return E_INVALID_ARGUMENT;
  char k[32];
  snprintf(k, sizeof k, "fan.%u", fan);
  return get_u32(g, k, out);
}
EXPORT nvmlReturn_t nvmlDeviceGetFanSpeed(nvmlDevice_t d, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetFanSpeed, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  rc = fan_speed(g, 0, out);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetFanSpeed_v2(nvmlDevice_t d, unsigned fan, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetFanSpeed_v2, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  rc = fan_speed(g, fan, out);
  END
}

/* ================================ clocks, utilization, memory ================================ */
static const char *clock_names[] = { "graphics", "sm", "mem", "video" };
static nvmlReturn_t clock_key(int g, const char *prefix, int type, unsigned *out) {
  if (!out || type < 0) return E_INVALID_ARGUMENT;
  if (type > 3) return E_NOT_SUPPORTED;
  char k[48];
  snprintf(k, sizeof k, "%s.%s", prefix, clock_names[type]);
  return get_u32(g, k, out);
}
EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetClockInfo, d)
  rc = clock_key(g, "clock", type, out);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t d, int type, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetMaxClockInfo, d)
  rc = clock_key(g, "clock_max", type, out);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
  BEGIN_DEV(nvmlDeviceGetUtilizationRates, d)
  if (!u) FAIL(E_INVALID_ARGUMENT);
  unsigned mig = 0;
  if (get_u32(g, "mig_mode", &mig) == OK && mig) FAIL(E_NOT_SUPPORTED);   /* as on MIG-enabled GPUs */
  if ((rc = get_u32(g, "util_gpu", &u->gpu)) == OK) rc = get_u32(g, "util_mem", &u->memory);
  END
}
static nvmlReturn_t codec_util(int g, const char *key, unsigned *util, unsigned *period) {
  if (!util || !period) return E_INVALID_ARGUMENT;
  *period = 167000;
  return get_u32(g, key, util);
}
EXPORT nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t d, unsigned *u, unsigned *p) {
  BEGIN_DEV(nvmlDeviceGetEncoderUtilization, d)
  rc = codec_util(g, "util_enc", u, p);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t d, unsigned *u, unsigned *p) {
  BEGIN_DEV(nvmlDeviceGetDecoderUtilization, d)
  rc = codec_util(g, "util_dec", u, p);
  END
}
/* Memory: the v2 struct splits reserved out of used, as the driver does; v1 folds it back in. */
static nvmlReturn_t memory(int g, unsigned long long *total, unsigned long long *reserved,
                           unsigned long long *used) {
  nvmlReturn_t rc;
  if ((rc = get_u64(g, "mem_total", total)) != OK) return rc;
  if (get_u64(g, "mem_reserved", reserved) != OK) *reserved = 0;
  if ((rc = get_u64(g, "mem_used", used)) != OK) return rc;
  return OK;
}
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
  BEGIN_DEV(nvmlDeviceGetMemoryInfo, d)
  if (!m) FAIL(E_INVALID_ARGUMENT);
  unsigned long long total, reserved, used;
  if ((rc = memory(g, &total, &reserved, &used)) != OK) goto out;
  m->total = total; m->used = used + reserved; m->free = total - used - reserved;
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
  BEGIN_DEV(nvmlDeviceGetMemoryInfo_v2, d)
  if (!m) FAIL(E_INVALID_ARGUMENT);
  if (m->version != MEMORY_V2_VERSION) FAIL(E_ARGUMENT_VERSION_MISMATCH);
  unsigned long long total, reserved, used;
  if ((rc = memory(g, &total, &reserved, &used)) != OK) goto out;
  m->total = total; m->reserved = reserved; m->used = used; m->free = total - used - reserved;
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetBAR1MemoryInfo(nvmlDevice_t d, nvmlBAR1Memory_t *m) {
  BEGIN_DEV(nvmlDeviceGetBAR1MemoryInfo, d)
  if (!m) FAIL(E_INVALID_ARGUMENT);
  if ((rc = get_u64(g, "bar1_total", &m->bar1Total)) != OK) goto out;
  if (get_u64(g, "bar1_used", &m->bar1Used) != OK) m->bar1Used = 0;
  m->bar1Free = m->bar1Total - m->bar1Used;
  END
}

/* ================================ PCIe, clock events, state ================================ */
EXPORT nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned *out) {
  BEGIN_DEV(nvmlDeviceGetPcieThroughput, d)
  if (!out || counter < 0 || counter > 1) FAIL(E_INVALID_ARGUMENT);
  rc = get_u32(g, counter == 0 ? "pcie_tx_kbs" : "pcie_rx_kbs", out);
  END
}
/* Per-process utilization samples: the fake keeps none, which the driver reports as NOT_FOUND. */
EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, void *samples, unsigned *count,
                                                    unsigned long long last_seen) {
  BEGIN_DEV(nvmlDeviceGetProcessUtilization, d)
  (void)samples; (void)last_seen;
  if (!count) FAIL(E_INVALID_ARGUMENT);
  rc = E_NOT_FOUND;
  END
}
U32_GETTER(nvmlDeviceGetPcieReplayCounter, "pcie_replay")
U32_GETTER(nvmlDeviceGetCurrPcieLinkGeneration, "pcie_gen")
U32_GETTER(nvmlDeviceGetCurrPcieLinkWidth, "pcie_width")
U32_GETTER(nvmlDeviceGetMaxPcieLinkGeneration, "pcie_gen_max")
U32_GETTER(nvmlDeviceGetMaxPcieLinkWidth, "pcie_width_max")
#define U64_GETTER(sym, key)                                                 \
  EXPORT nvmlReturn_t sym(nvmlDevice_t d, unsigned long long *out) {         \
    BEGIN_DEV(sym, d)                                                        \
    if (!out) FAIL(E_INVALID_ARGUMENT);                                      \
    rc = get_u64(g, key, out);                                               \
    END                                                                      \
  }
U64_GETTER(nvmlDeviceGetCurrentClocksEventReasons, "throttle")
U64_GETTER(nvmlDeviceGetCurrentClocksThrottleReasons, "throttle")
U64_GETTER(nvmlDeviceGetSupportedClocksEventReasons, "throttle_supported")
U64_GETTER(nvmlDeviceGetSupportedClocksThrottleReasons, "throttle_supported")

/* nvmlPerfPolicyType_t 0..5 -> state key; field ids 74..79 read the same keys */
static const char *violation_keys[] = { "violation.power", "violation.thermal", "violation.sync_boost",
                                        "violation.board_limit", "violation.low_util", "violation.reliability" };
EXPORT nvmlReturn_t nvmlDeviceGetViolationStatus(nvmlDevice_t d, int policy, nvmlViolationTime_t *v) {
  BEGIN_DEV(nvmlDeviceGetViolationStatus, d)
  if (!v || policy < 0) FAIL(E_INVALID_ARGUMENT);
  if (policy > 5) FAIL(E_NOT_SUPPORTED);
  if ((rc = get_u64(g, violation_keys[policy], &v->violationTime)) != OK) goto out;
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  v->referenceTime = (unsigned long long)now.tv_sec * 1000000ull + (unsigned long long)now.tv_nsec / 1000;
  END
}
#define ENUM_GETTER(sym, key)                                                \
  EXPORT nvmlReturn_t sym(nvmlDevice_t d, int *out) {                        \
    BEGIN_DEV(sym, d)                                                        \
    unsigned v;                                                              \
    if (!out) FAIL(E_INVALID_ARGUMENT);                                      \
    if ((rc = get_u32(g, key, &v)) == OK) *out = (int)v;                     \
    END                                                                      \
  }
ENUM_GETTER(nvmlDeviceGetPerformanceState, "pstate")
ENUM_GETTER(nvmlDeviceGetPowerState, "pstate")
ENUM_GETTER(nvmlDeviceGetPersistenceMode, "persistence")
ENUM_GETTER(nvmlDeviceGetComputeMode, "compute_mode")
EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned *cur, unsigned *pend) {
  BEGIN_DEV(nvmlDeviceGetMigMode, d)
  if (!cur || !pend) FAIL(E_INVALID_ARGUMENT);
  if ((rc = get_u32(g, "mig_mode", cur)) == OK) *pend = *cur;
  END
}

/* ================================ ECC, retirement, remapping ================================ */
EXPORT nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t d, int *cur, int *pend) {
  BEGIN_DEV(nvmlDeviceGetEccMode, d)
  if (!cur || !pend) FAIL(E_INVALID_ARGUMENT);
  unsigned c, p;
  if ((rc = get_u32(g, "ecc_mode", &c)) != OK) goto out;
  if (get_u32(g, "ecc_pending", &p) != OK) p = c;
  *cur = (int)c; *pend = (int)p;
  END
}
/* [errorType][counterType]: corrected/uncorrected x volatile/aggregate; field ids 3..6 */
static const char *ecc_keys[2][2] = { { "ecc.sbe_vol", "ecc.sbe_agg" }, { "ecc.dbe_vol", "ecc.dbe_agg" } };
static nvmlReturn_t ecc_counter(int g, int etype, int ctype, unsigned long long *out) {
  unsigned mode;
  if (get_u32(g, "ecc_mode", &mode) == OK && !mode) return E_NOT_SUPPORTED;   /* ECC off: counters N/A */
  return get_u64(g, ecc_keys[etype][ctype], out);
}
EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int etype, int ctype, unsigned long long *out) {
  BEGIN_DEV(nvmlDeviceGetTotalEccErrors, d)
  if (!out || etype < 0 || etype > 1 || ctype < 0 || ctype > 1) FAIL(E_INVALID_ARGUMENT);
  rc = ecc_counter(g, etype, ctype, out);
  END
}
static const char *retired_keys[] = { "retired_sbe", "retired_dbe" };
static nvmlReturn_t retired_pages(int g, int cause, unsigned *count, unsigned long long *addrs,
                                  unsigned long long *stamps) {
  if (!count || cause < 0 || cause > 1) return E_INVALID_ARGUMENT;
  unsigned n;
  nvmlReturn_t rc = get_u32(g, retired_keys[cause], &n);
  if (rc != OK) return rc;
  if (*count < n || !addrs) { unsigned had = *count; *count = n; return (n == 0 || had >= n) ? OK : E_INSUFFICIENT_SIZE; }
  for (unsigned i = 0; i < n; i++) {
    addrs[i] = 0x100000ull * (i + 1) + (unsigned long long)cause;
    if (stamps) stamps[i] = 1700000000ull + i;
  }
  *count = n;
  return OK;
}
EXPORT nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t d, int cause, unsigned *count, unsigned long long *addrs) {
  BEGIN_DEV(nvmlDeviceGetRetiredPages, d)
  rc = retired_pages(g, cause, count, addrs, NULL);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetRetiredPages_v2(nvmlDevice_t d, int cause, unsigned *count,
                                                 unsigned long long *addrs, unsigned long long *stamps) {
  BEGIN_DEV(nvmlDeviceGetRetiredPages_v2, d)
  rc = retired_pages(g, cause, count, addrs, stamps);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t d, int *out) {
  BEGIN_DEV(nvmlDeviceGetRetiredPagesPendingStatus, d)
  unsigned v;
  if (!out) FAIL(E_INVALID_ARGUMENT);
  if ((rc = get_u32(g, "retired_pending", &v)) == OK) *out = (int)v;
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t d, unsigned *cor, unsigned *unc, unsigned *pend,
                                              unsigned *fail) {
  BEGIN_DEV(nvmlDeviceGetRemappedRows, d)
  if (!cor || !unc || !pend || !fail) FAIL(E_INVALID_ARGUMENT);
  unsigned mig = 0;
  if (get_u32(g, "mig_mode", &mig) == OK && mig) FAIL(E_NOT_SUPPORTED);
  if ((rc = get_u32(g, "remap_cor", cor)) != OK || (rc = get_u32(g, "remap_unc", unc)) != OK ||
      (rc = get_u32(g, "remap_pending", pend)) != OK || (rc = get_u32(g, "remap_failure", fail)) != OK)
    goto out;
  END
}

/* ================================ NVLink ================================ */
/* Links 0..nvlink_count-1 exist; gpu.N.nvlink.L.up (default 1) says whether one is active. An inactive
 * link answers NOT_SUPPORTED for its counters, as real ports do. */
static nvmlReturn_t link_check(int g, unsigned link, int need_active) {
  unsigned n;
  nvmlReturn_t rc = get_u32(g, "nvlink_count", &n);
  if (rc != OK) return rc;
  if (n == 0) return E_NOT_SUPPORTED;                 /* no NVLink (an H200 passed through alone) */
  if (link >= n || link >= MAX_LINKS) return E_INVALID_ARGUMENT;
  if (need_active) {
    char k[48]; unsigned up = 1;
    snprintf(k, sizeof k, "nvlink.%u.up", link);
    if (get_u32(g, k, &up) == OK && !up) return E_NOT_SUPPORTED;
  }
  return OK;
}
static const char *nvlink_counter_names[] = { "replay", "recovery", "crc_flit", "crc_data" };
static nvmlReturn_t link_counter(int g, unsigned link, int counter, unsigned long long *out) {
  nvmlReturn_t rc = link_check(g, link, 1);
  if (rc != OK) return rc;
  if (counter < 0 || counter > 3) return E_NOT_SUPPORTED;
  char k[48];
  snprintf(k, sizeof k, "nvlink.%u.%s", link, nvlink_counter_names[counter]);
  rc = get_u64(g, k, out);
  if (rc == E_NOT_SUPPORTED) { *out = 0; rc = OK; }     /* an active link with no errors counts 0 */
  return rc;
}
EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t d, unsigned link, int *active) {
  BEGIN_DEV(nvmlDeviceGetNvLinkState, d)
  if (!active) FAIL(E_INVALID_ARGUMENT);
  if ((rc = link_check(g, link, 0)) != OK) goto out;
  char k[48]; unsigned up = 1;
  snprintf(k, sizeof k, "nvlink.%u.up", link);
  get_u32(g, k, &up);
  *active = up ? 1 : 0;
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t d, unsigned link, int counter,
                                                    unsigned long long *out) {
  BEGIN_DEV(nvmlDeviceGetNvLinkErrorCounter, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  rc = link_counter(g, link, counter, out);
  END
}

/* ================================ field values ================================ */
static void set_ull(nvmlFieldValue_t *f, unsigned long long v) { f->valueType = VT_ULL; f->value.ull = v; }
static void set_uint(nvmlFieldValue_t *f, unsigned v) { f->valueType = VT_UINT; f->value.ui = v; }

/* Per-link field ids: {first id for links 0-5, first id for links 6-11, counter}; totals at first+6. */
static const struct { unsigned lo, hi; int counter; } link_fields[] = {
  { 32, 96, 2 }, { 39, 102, 3 }, { 46, 108, 0 }, { 53, 114, 1 } };

static nvmlReturn_t field_value(int g, nvmlFieldValue_t *f) {
  unsigned id = f->fieldId, u; unsigned long long ull; nvmlReturn_t rc;
#define UINT_KEY(key) do { if ((rc = get_u32(g, key, &u)) == OK) set_uint(f, u); return rc; } while (0)
#define ULL_KEY(key) do { if ((rc = get_u64(g, key, &ull)) == OK) set_ull(f, ull); return rc; } while (0)
  switch (id) {
    case 1: UINT_KEY("ecc_mode");
    case 2: if (get_u32(g, "ecc_pending", &u) == OK) { set_uint(f, u); return OK; } UINT_KEY("ecc_mode");
    case 3: case 4: case 5: case 6:
      if ((rc = ecc_counter(g, id >= 4 && id != 5, id >= 5, &ull)) == OK) set_ull(f, ull);
      return rc;
    case 29: ULL_KEY("retired_sbe");
    case 30: ULL_KEY("retired_dbe");
    case 31: UINT_KEY("retired_pending");
    case 74: case 75: case 76: case 77: case 78: case 79: ULL_KEY(violation_keys[id - 74]);
    case 82: UINT_KEY("mem_temp");
    case 83: ULL_KEY("energy_mj");
    case 91: UINT_KEY("nvlink_count");
    case 94: UINT_KEY("pcie_replay");
    case 95: UINT_KEY("pcie_replay_rollover");
    /* typed unsigned long long, as a real H200 answers them (docs/hardware/h200-580.159.04.raw.json) */
    case 142: ULL_KEY("remap_cor");
    case 143: ULL_KEY("remap_unc");
    case 144: ULL_KEY("remap_pending");
    case 145: ULL_KEY("remap_failure");
    case 161: case 162: case 163:
      if ((rc = link_counter(g, f->scopeId, id == 161 ? 0 : id == 162 ? 1 : 2, &ull)) == OK) set_ull(f, ull);
      return rc;
    case 165:
      if ((rc = link_check(g, f->scopeId, 0)) != OK) return rc;
      { char k[48]; unsigned up = 1; snprintf(k, sizeof k, "nvlink.%u.up", f->scopeId); get_u32(g, k, &up);
        set_uint(f, up ? 1 : 0); }
      return OK;
    case 185: UINT_KEY("power_mw");
    case 186: if (gkey(g, "power_instant_mw")) UINT_KEY("power_instant_mw"); UINT_KEY("power_mw");
    case 187: UINT_KEY("power_min_mw");
    case 188: UINT_KEY("power_max_mw");
    case 189: UINT_KEY("power_default_mw");
    case 190: UINT_KEY("power_limit_mw");
    /* T.Limit offsets (signed int C, Ada and later): tlimit.{shutdown,slowdown,mem_max,gpu_max} */
    case 193: case 194: case 195: case 196: {
      static const char *tl[] = { "tlimit.shutdown", "tlimit.slowdown", "tlimit.mem_max", "tlimit.gpu_max" };
      const char *v = gkey(g, tl[id - 193]);
      if (!v) return E_NOT_SUPPORTED;
      f->valueType = VT_SINT; f->value.si = (int)strtol(v, NULL, 0);
      return OK;
    }
    case 230: UINT_KEY("recovery_action");
  }
  for (size_t k = 0; k < sizeof link_fields / sizeof link_fields[0]; k++) {
    unsigned link;
    if (id >= link_fields[k].lo && id < link_fields[k].lo + 6) link = id - link_fields[k].lo;
    else if (id >= link_fields[k].hi && id < link_fields[k].hi + 6) link = id - link_fields[k].hi + 6;
    else if (id == link_fields[k].lo + 6) {           /* _TOTAL over active links */
      unsigned n; unsigned long long sum = 0, v;
      if ((rc = get_u32(g, "nvlink_count", &n)) != OK) return rc;
      for (unsigned l = 0; l < n; l++) if (link_counter(g, l, link_fields[k].counter, &v) == OK) sum += v;
      set_ull(f, sum);
      return OK;
    } else continue;
    if ((rc = link_counter(g, link, link_fields[k].counter, &ull)) == OK) set_ull(f, ull);
    return rc;
  }
  /* Ids the fake does not model: gpu.N.fi.<id>[@scope]=<u|ull|i|d|e>:<value> */
  char k[64];
  const char *v;
  snprintf(k, sizeof k, "fi.%u@%u", id, f->scopeId);
  if (!(v = gkey(g, k))) { snprintf(k, sizeof k, "fi.%u", id); v = gkey(g, k); }
  if (!v) return E_NOT_SUPPORTED;
  const char *colon = strchr(v, ':');
  if (!colon) return E_UNKNOWN;
  size_t tl = (size_t)(colon - v);
  const char *num = colon + 1;
  if (tl == 1 && v[0] == 'e') return (nvmlReturn_t)strtol(num, NULL, 0);
  if (tl == 1 && v[0] == 'u') set_uint(f, (unsigned)strtoul(num, NULL, 0));
  else if (tl == 3 && !strncmp(v, "ull", 3)) set_ull(f, strtoull(num, NULL, 0));
  else if (tl == 1 && v[0] == 'i') { f->valueType = VT_SINT; f->value.si = (int)strtol(num, NULL, 0); }
  else if (tl == 1 && v[0] == 'd') { f->valueType = VT_DOUBLE; f->value.d = strtod(num, NULL); }
  else return E_UNKNOWN;
  return OK;
#undef UINT_KEY
#undef ULL_KEY
}
/* What one field costs the driver: gpu.N.latency_us.field.<id>, else latency_us.field.<id>. On a real
 * H200 the energy counter (83) alone took ~2.8 ms, thermal violation time (75) ~0.6 ms, PCIe replays
 * (94) ~0.15 ms, the rest ~2 us; the driver reports it in latencyUsec and the call lasts the sum. */
static long field_latency(int g, unsigned id) {
  char k[64]; const char *v;
  snprintf(k, sizeof k, "gpu.%d.latency_us.field.%u", g, id);
  if ((v = lookup(k))) return strtol(v, NULL, 0);
  snprintf(k, sizeof k, "latency_us.field.%u", id);
  return (v = lookup(k)) ? strtol(v, NULL, 0) : 0;
}
EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t d, int count, nvmlFieldValue_t *values) {
  BEGIN_DEV(nvmlDeviceGetFieldValues, d)
  if (!values || count <= 0) FAIL(E_INVALID_ARGUMENT);
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  int timed = field_latency_keys;
  for (int i = 0; i < count; i++) {
    nvmlFieldValue_t *f = &values[i];
    f->timestamp = (long long)now.tv_sec * 1000000 + now.tv_nsec / 1000;
    f->latencyUsec = timed ? field_latency(g, f->fieldId) : 0;
    f->nvmlReturn = field_value(g, f);
    lat_ += f->latencyUsec;
  }
  END
}

/* ================================ processes ================================ */
/* gpu.N.procs=pid:bytes[,pid:bytes...]; two-call protocol as the driver's */
static nvmlReturn_t processes(int g, const char *key, unsigned *count, nvmlProcessInfo_t *infos) {
  if (!count) return E_INVALID_ARGUMENT;
  const char *v = gkey(g, key);
  if (v && v[0] == 'e' && v[1] == ':') return (nvmlReturn_t)strtol(v + 2, NULL, 0);
  nvmlProcessInfo_t list[MAX_PROCS];
  unsigned n = 0;
  for (const char *p = v; p && *p && n < MAX_PROCS;) {
    char *end;
    unsigned long pid = strtoul(p, &end, 10);
    if (end == p) break;
    unsigned long long used = *end == ':' ? strtoull(end + 1, &end, 10) : ~0ull;
    list[n++] = (nvmlProcessInfo_t){ (unsigned)pid, used, 0xFFFFFFFFu, 0xFFFFFFFFu };
    p = strchr(end, ',');
    if (p) p++;
  }
  if (*count < n || (!infos && n)) { *count = n; return E_INSUFFICIENT_SIZE; }
  *count = n;
  if (n) memcpy(infos, list, n * sizeof *list);
  return OK;
}
EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned *count, nvmlProcessInfo_t *p) {
  BEGIN_DEV(nvmlDeviceGetComputeRunningProcesses_v3, d)
  rc = processes(g, "procs", count, p);
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned *count, nvmlProcessInfo_t *p) {
  BEGIN_DEV(nvmlDeviceGetGraphicsRunningProcesses_v3, d)
  rc = processes(g, "graphics_procs", count, p);
  END
}

/* ================================ events ================================ */
typedef struct event_set { uint32_t magic; long offset; unsigned long long mask[MAX_GPUS]; } *nvmlEventSet_t;
#define SET_MAGIC 0x45565453u

static const char *events_path(char *buf, size_t n) {
  const char *p = getenv("FAKE_NVML_EVENTS");
  if (p && *p) return p;
  const char *s = getenv("FAKE_NVML_STATE");
  snprintf(buf, n, "%s.events", s ? s : "");
  return buf;
}
EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *out) {
  BEGIN(nvmlEventSetCreate)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  nvmlEventSet_t s = calloc(1, sizeof *s);
  if (!s) FAIL(20);
  s->magic = SET_MAGIC;
  char buf[4200];
  struct stat st;
  s->offset = stat(events_path(buf, sizeof buf), &st) == 0 ? (long)st.st_size : 0;   /* only later events */
  *out = s;
  END
}
EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *out) {
  BEGIN_DEV(nvmlDeviceGetSupportedEventTypes, d)
  if (!out) FAIL(E_INVALID_ARGUMENT);
  rc = get_u64(g, "events_supported", out);
  END
}
EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long mask, nvmlEventSet_t set) {
  BEGIN_DEV(nvmlDeviceRegisterEvents, d)
  if (!set || set->magic != SET_MAGIC) FAIL(E_INVALID_ARGUMENT);
  unsigned long long supported;
  if ((rc = get_u64(g, "events_supported", &supported)) != OK) goto out;
  if (mask & ~supported) FAIL(E_NOT_SUPPORTED);
  set->mask[g] |= mask;
  END
}
/* Deliver the next complete, registered line past the set's offset. Called with the lock held. */
static int next_event(nvmlEventSet_t set, nvmlEventData_t *data) {
  char path[4200];
  FILE *f = fopen(events_path(path, sizeof path), "r");
  if (!f) return 0;
  int found = 0;
  char line[256];
  if (fseek(f, set->offset, SEEK_SET) == 0) {
    while (!found && fgets(line, sizeof line, f)) {
      size_t n = strlen(line);
      if (n == 0 || line[n - 1] != '\n') break;           /* a line still being written */
      set->offset += (long)n;
      unsigned gpu; unsigned long long type, value; unsigned gi = 0xFFFFFFFFu, ci = 0xFFFFFFFFu;
      if (sscanf(line, "%u %lli %lli %u %u", &gpu, &type, &value, &gi, &ci) < 3) continue;
      if (gpu >= MAX_GPUS || gpu >= (unsigned)gpu_count() || is_absent((int)gpu) || !(set->mask[gpu] & type)) continue;
      *data = (nvmlEventData_t){ &devs[gpu], type, value, gi, ci };
      found = 1;
    }
  }
  fclose(f);
  return found;
}
/* An inotify descriptor watching the directories of the state and events files (called unlocked),
 * or -1 where inotify is not available: the wait then polls every 5 ms. */
static int watch_files(void) {
  int fd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (fd < 0) return -1;
  char buf[4096], copy[4096];
  const char *state = getenv("FAKE_NVML_STATE");
  const char *paths[2] = { state ? state : "", events_path(buf, sizeof buf) };
  int watched = 0;
  for (int i = 0; i < 2; i++) {
    if (!*paths[i]) continue;
    snprintf(copy, sizeof copy, "%s", paths[i]);
    if (inotify_add_watch(fd, dirname(copy), IN_CLOSE_WRITE | IN_MOVED_TO | IN_MODIFY | IN_CREATE) >= 0) watched++;
  }
  if (!watched) { close(fd); return -1; }
  return fd;
}

/* Like the driver, a waiting thread costs nothing until an event arrives or the timeout passes: it
 * sleeps on inotify for changes to the state or events file, re-checking at least every second (a
 * missed notification delays an event, it does not lose it; shorter slices would be wake-ups the
 * idle exporter pays for: make bench's idle figure). */
static nvmlReturn_t event_wait(int sym, nvmlEventSet_t set, nvmlEventData_t *data, unsigned timeout_ms) {
  long lat_ = 0;
  nvmlReturn_t rc = enter(sym, &lat_);
  if (rc != OK) return leave(rc, lat_, -1);
  if (!set || set->magic != SET_MAGIC || !data) return leave(E_INVALID_ARGUMENT, lat_, -1);
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  pthread_mutex_unlock(&lock);
  int watch = watch_files();  /* before the first check, so that no change between the two is missed */
  pthread_mutex_lock(&lock);
  for (;;) {
    reload(0);
    if (next_event(set, data)) { rc = OK; break; }
    int lost = 0;
    for (int i = 0; i < gpu_count(); i++)
      if (set->mask[i] && is_lost(i)) lost = 1;
    if (lost) { rc = E_GPU_IS_LOST; break; }
    clock_gettime(CLOCK_MONOTONIC, &now);
    long elapsed_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
    if (elapsed_ms >= (long)timeout_ms) { rc = E_TIMEOUT; break; }
    long left = (long)timeout_ms - elapsed_ms;
    pthread_mutex_unlock(&lock);
    if (watch >= 0) {
      struct pollfd pfd = { watch, POLLIN, 0 };
      if (poll(&pfd, 1, (int)(left < 1000 ? left : 1000)) > 0) {
        char drain[4096];
        while (read(watch, drain, sizeof drain) > 0) {}
      }
    } else {
      struct timespec ts = { 0, (left < 5 ? left : 5) * 1000000 };
      nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&lock);
  }
  if (watch >= 0) close(watch);
  return leave(rc, lat_, -1);
}
EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned timeout_ms) {
  return event_wait(S_nvmlEventSetWait_v2, set, data, timeout_ms);
}
EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned timeout_ms) {
  return event_wait(S_nvmlEventSetWait, set, data, timeout_ms);
}
EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
  BEGIN(nvmlEventSetFree)
  if (!set || set->magic != SET_MAGIC) FAIL(E_INVALID_ARGUMENT);
  set->magic = 0;
  free(set);
  END
}

/* ================================ test hooks (not NVML) ================================ */
EXPORT unsigned long long fakeNvmlCallCount(const char *symbol) {
  pthread_once(&counters_once, counters_init);
  for (int i = 0; i < NSYMS; i++)
    if (symbol && strcmp(sym_names[i], symbol) == 0) return __atomic_load_n(&counters[i].count, __ATOMIC_RELAXED);
  return 0;
}
EXPORT void fakeNvmlResetCallCounts(void) {
  pthread_once(&counters_once, counters_init);
  for (int i = 0; i < NSYMS; i++) __atomic_store_n(&counters[i].count, 0, __ATOMIC_RELAXED);
}
EXPORT int fakeNvmlReload(void) {
  pthread_mutex_lock(&lock);
  reload(1);
  int n = 0;
  for (size_t i = 0; i < table_cap; i++) n += table[i].key != NULL;
  pthread_mutex_unlock(&lock);
  return n;
}
