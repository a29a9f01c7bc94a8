# What ops/cassandra/cassandra.sh and ops/kafka/kafka.sh share: one JVM server on 127.0.0.1 whose jars
# come from Maven Central. Sourced, not run. The sourcing script sets, before it sources this file:
#
#   SERVICE        short name: messages, the pid file (DATA_DIR/$SERVICE.pid)
#   GROUP_ID ARTIFACT_ID   the Maven artifact whose runtime dependencies make the classpath
#   VERSION_PIN    the version the operator asked for ("" = the first of CANDIDATE_VERSIONS that resolves)
#   CANDIDATE_VERSIONS     versions to try, newest first
#   MAIN_CLASS     a string of the JVM's command line that tells it is ours (a recycled pid is not)
#   STOP_TIMEOUT   seconds between SIGTERM and SIGKILL
#   LOG_FILES      file names under DATA_DIR/logs shown when a start fails
# and may define:
#   extra_dependencies   prints more <dependency> elements for the pom
#   after_fetch          runs after new jars are in place (e.g. drop a cache built from the old ones)
#   after_stop DATA_DIR  runs after a clean stop
#   describe_running DATA_DIR   prints where a running server listens
# It defines the helpers below and cmd_fetch, cmd_stop, cmd_status, and dispatch "$@".
# PYTHON: the interpreter of the readiness checks, which import the server's client library; settle
# passes the one it runs under (engine/verify/servers.py), python3 from PATH otherwise.

MAIN_SCRIPT="${BASH_SOURCE[1]}"  # the script that sourced this file
SCRIPT_DIR="$(cd "$(dirname "$MAIN_SCRIPT")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
CACHE_DIR="${SETTLE_CACHE:-$REPO_ROOT/.cache}/$SERVICE"
LIB_DIR="$CACHE_DIR/lib"
MARKER="$LIB_DIR/.complete"
HOST=127.0.0.1  # the address the server binds; a script may take another from its options
PYTHON="${PYTHON:-python3}"
if [[ -n "${JAVA:-}" ]]; then
    :
elif [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA="$JAVA_HOME/bin/java"
else
    JAVA=java
fi

die() { echo "$SERVICE.sh: $*" >&2; exit 1; }
log() { echo "$SERVICE.sh: $*" >&2; }

usage() {
    sed -n '2,9p' "$MAIN_SCRIPT" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------- fetch

write_pom() {  # $1 = dir, $2 = version
    cat >"$1/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>settle.ops</groupId>
  <artifactId>$SERVICE-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>$GROUP_ID</groupId>
      <artifactId>$ARTIFACT_ID</artifactId>
      <version>$2</version>
    </dependency>
$(if declare -F extra_dependencies >/dev/null; then extra_dependencies; fi)
  </dependencies>
</project>
EOF
}

# Is a complete download there (of VERSION_PIN, when that is set)?
fetched() {
    [[ -f "$MARKER" ]] && [[ -z "$VERSION_PIN" || "$(cat "$MARKER")" == "$VERSION_PIN" ]]
}

fetch_locked() {
    if fetched; then
        return 0
    fi
    command -v mvn >/dev/null || die "fetch: mvn (Maven) is not on PATH"
    local build="$CACHE_DIR/fetch" tmp_lib="$CACHE_DIR/lib.tmp" version started=$SECONDS
    mkdir -p "$build"
    for version in $CANDIDATE_VERSIONS; do
        rm -rf "$tmp_lib"
        write_pom "$build" "$version"
        log "fetch: resolving $GROUP_ID:$ARTIFACT_ID:$version and its runtime dependencies"
        if mvn -B -q -f "$build/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$tmp_lib" >"$build/mvn.log" 2>&1; then
            if [[ -f "$tmp_lib/$ARTIFACT_ID-$version.jar" ]]; then
                echo "$version" >"$tmp_lib/.complete"
                rm -rf "$LIB_DIR"
                if declare -F after_fetch >/dev/null; then after_fetch; fi
                mv "$tmp_lib" "$LIB_DIR"
                local jars=("$LIB_DIR"/*.jar)
                log "fetch: $SERVICE $version, ${#jars[@]} jars in $LIB_DIR ($((SECONDS - started)) s)"
                return 0
            fi
        fi
        log "fetch: $ARTIFACT_ID $version did not resolve:"
        grep -E 'ERROR|error:' "$build/mvn.log" | head -5 >&2 || tail -5 "$build/mvn.log" >&2
    done
    rm -rf "$tmp_lib"
    die "fetch: none of [$CANDIDATE_VERSIONS] could be downloaded (full log: $build/mvn.log)"
}

cmd_fetch() {
    mkdir -p "$CACHE_DIR"
    if fetched; then
        return 0
    fi
    # Several test workers may fetch at once: one downloads, the others wait for it.
    exec 9>"$CACHE_DIR/.fetch.lock"
    flock 9
    fetch_locked
    exec 9>&-
}

installed_version() { cat "$MARKER"; }

# --------------------------------------------------------------------------------------------- helpers

# Is PID a live server JVM of ours? A zombie counts as gone (PID 1 may be slow or never reap it), and
# so does a recycled pid whose command line is not MAIN_CLASS's.
alive() {
    local pid="$1" state cmdline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z* ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"$MAIN_CLASS"* ]]
}

read_pid() {
    if [[ -f "$1/$SERVICE.pid" ]]; then cat "$1/$SERVICE.pid"; fi
}

port_free() {  # can we listen on $HOST:$1 ? (SO_REUSEADDR like the JVM: TIME_WAIT is no obstacle)
    "$PYTHON" - "$1" "$HOST" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[2], int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

free_ports() {  # print N distinct free ports of $HOST, below the kernel's ephemeral range (or in SETTLE_PORT_RANGE)
    # A port from the ephemeral range (what binding port 0 gives) can become the local end of an outgoing
    # connection: a client reconnecting to a killed server's port connects to itself on it (TCP
    # simultaneous open) and holds it, and the server's restart on that port fails: address in use.
    "$PYTHON" - "$1" "$HOST" <<'EOF'
import os, random, socket, sys
try:
    high = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    high = 32768
low = 10000
if os.environ.get("SETTLE_PORT_RANGE"):  # LOW-HIGH: the range this process may pick from (see free_port)
    low, high = (int(part) for part in os.environ["SETTLE_PORT_RANGE"].split("-"))
socks = []
for _ in range(int(sys.argv[1])):
    for _ in range(1000):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((sys.argv[2], random.randrange(low, high) if high > low + 100 else 0))
        except OSError:
            s.close()
            continue
        socks.append(s)
        break
    else:
        sys.exit("no free port below the ephemeral range")
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

log_tail() {
    local dir="$1" f
    for f in "${LOG_FILES[@]}"; do
        f="$dir/logs/$f"
        if [[ -s "$f" ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 40 "$f" >&2
        fi
    done
}

# ------------------------------------------------------------------------------------------ stop, status

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local dir="$1" pid timeout="$STOP_TIMEOUT"
    pid="$(read_pid "$dir")"
    if ! alive "$pid"; then
        echo "$SERVICE not running (data dir $dir)"
        rm -f "$dir/$SERVICE.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while alive "$pid"; do
        if (( waited >= timeout * 10 )); then
            log "stop: pid $pid still alive after ${timeout} s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            waited=0
            timeout=30
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$dir/$SERVICE.pid"
    if declare -F after_stop >/dev/null; then after_stop "$dir"; fi
    echo "$SERVICE stopped (pid $pid)"
}

cmd_status() {
    [[ $# -eq 1 ]] || usage
    local dir="$1" pid
    pid="$(read_pid "$dir")"
    if alive "$pid"; then
        echo "$SERVICE running: pid $pid, $(describe_running "$dir")"
    else
        echo "$SERVICE not running (data dir $dir)"
        return 3
    fi
}

dispatch() {
    case "${1:-}" in
        fetch) shift; cmd_fetch "$@"; echo "$SERVICE jars $(installed_version) in $LIB_DIR" ;;
        start) shift; cmd_start "$@" ;;
        stop) shift; cmd_stop "$@" ;;
        status) shift; cmd_status "$@" ;;
        *) usage ;;
    esac
}
