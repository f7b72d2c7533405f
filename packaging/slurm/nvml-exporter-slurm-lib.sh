# Shared by nvml-exporter-prolog and nvml-exporter-epilog (sourced, POSIX sh).

nvml_exporter_slurm_log() {
    echo "nvml-exporter-slurm: job ${SLURM_JOB_ID:-?}: $*" >&2
}

# The UUIDs of the job's GPUs, one a line.
nvml_exporter_slurm_uuids() {
    ids=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}
    [ -n "$ids" ] || return 0
    table=
    for id in $(echo "$ids" | tr ',' ' '); do
        case $id in
            GPU-*|MIG-*) echo "$id" ;;
            *[!0-9]*) nvml_exporter_slurm_log "GPU id '$id' is neither an index nor a UUID: skipped" ;;
            *)
                if [ -z "$table" ]; then
                    table=$("${NVIDIA_SMI:-nvidia-smi}" --query-gpu=index,uuid --format=csv,noheader) || {
                        nvml_exporter_slurm_log "nvidia-smi failed: no attribution"
                        return 0
                    }
                fi
                uuid=$(echo "$table" | awk -F', *' -v i="$id" '$1 == i { print $2 }')
                if [ -n "$uuid" ]; then echo "$uuid"; else nvml_exporter_slurm_log "no GPU of index $id"; fi
                ;;
        esac
    done
}

# add|remove this job's line in each of its GPUs' files, under a lock shared with other jobs' prologs and
# epilogs (GPUs may be shared), each file replaced by a rename so the exporter never reads half of one.
nvml_exporter_slurm() {
    dir=${NVML_EXPORTER_SLURM_DIR:-/run/prometheus-nvml-exporter/slurm}
    umask 022  # the exporter runs as its own user: it must be able to read the files
    job=${SLURM_JOB_ID:-}
    case $job in
        ''|*[!0-9A-Za-z_.+-]*) nvml_exporter_slurm_log "no usable SLURM_JOB_ID: nothing done"; return 0 ;;
    esac
    mkdir -p "$dir" 2>/dev/null && chmod 0755 "$dir" 2>/dev/null
    [ -d "$dir" ] && [ -w "$dir" ] || { nvml_exporter_slurm_log "cannot write $dir: nothing done"; return 0; }
    line=$job
    for kv in "user=${SLURM_JOB_USER:-}" "account=${SLURM_JOB_ACCOUNT:-}" "partition=${SLURM_JOB_PARTITION:-}"; do
        case $kv in
            *=) ;;  # not known: left out
            *[!0-9A-Za-z_.@+=-]*) nvml_exporter_slurm_log "'$kv' has characters the file format cannot hold: left out" ;;
            *) line="$line $kv" ;;
        esac
    done
    uuids=$(nvml_exporter_slurm_uuids)
    [ -n "$uuids" ] || return 0
    (
        flock -w 10 9 || { nvml_exporter_slurm_log "lock on $dir busy: nothing done"; exit 0; }
        for uuid in $uuids; do
            # (MIG-GPU-…/gi/ci, the names of drivers before R470, cannot be file names)
            case $uuid in *[!0-9A-Za-z-]*) nvml_exporter_slurm_log "odd UUID '$uuid': skipped"; continue ;; esac
            file="$dir/$uuid" tmp="$dir/.$uuid.$$"
            { [ -f "$file" ] && awk -v j="$job" '$1 != j' "$file"; [ "$1" = add ] && echo "$line"; } >"$tmp"
            if [ -s "$tmp" ]; then mv -f "$tmp" "$file"; else rm -f "$tmp" "$file"; fi
        done
    ) 9>>"$dir/.lock"
}
