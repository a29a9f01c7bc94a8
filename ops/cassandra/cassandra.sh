#!/usr/bin/env bash
# Run a real single-node Apache Cassandra 5.0.x on 127.0.0.1 for tests and local runs,
# without Docker and without the Cassandra tarball: the jars come from Maven Central.
#
#   cassandra.sh fetch
#   cassandra.sh start DATA_DIR [--cql-port P] [--storage-port P] [--jmx-port P] [NODE OPTIONS]
#   cassandra.sh stop DATA_DIR
#   cassandra.sh status DATA_DIR
#
# Node options (a node of a cluster: ops/cassandra/cluster.sh passes them; a restart without them reuses
# the ones saved in DATA_DIR/node.conf): --address A (a loopback address, default 127.0.0.1),
# --seeds A,B,... --cluster-name N --dc DC (GossipingPropertyFileSnitch, rack1), --auth
# (PasswordAuthenticator + CassandraAuthorizer), --tls-dir DIR (client-to-node TLS required: DIR/A.p12,
# DIR/keystore.password, DIR/ca.pem, as cluster.sh makes them).
#
# What it took (verified with 5.0.9 on OpenJDK 17):
# - Jars: `mvn dependency:copy-dependencies` of org.apache.cassandra:cassandra-all gives a complete
#   runtime classpath (about 100 jars, 66 MB); no extra artifact was needed. Maven's local repo is
#   the default ~/.m2.
# - JVM flags: the JPMS --add-exports/--add-opens list and Netty properties are copied from
#   Cassandra 5.0's conf/jvm17-server.options (they are not inside the jar); -ea, -Xss256k,
#   preferIPv4Stack and the jamm javaagent come from jvm-server.options / cassandra-env.sh.
#   -XX:+AlwaysPreTouch, -XX:+UseNUMA and GC logging are left out on purpose (slow start-up).
# - Fast start-up (measured on an idle 2-core box: ~5 s -> ~3 s to CQL ready):
#   auto_bootstrap false, the node is its own seed, random tokens (no
#   allocate_tokens_for_local_replication_factor: the token allocator waits 1 s for schema),
#   -Dcassandra.skip_wait_for_gossip_to_settle=0, -Dcassandra.ring_delay_ms=1000,
#   -Dcassandra.load_ring_state=false, -Dcassandra.skip_schema_check=true,
#   -Dcassandra.memtable.row_overhead_size=181 (skips a 0.5 s measurement at boot; 181 is what it
#   measures here), and a class-data-sharing (AppCDS) archive of the JVM's classes, written to the
#   cache by the first clean stop and mapped by every later start (-0.9 s; see CASSANDRA_CDS).
#   -XX:TieredStopAtLevel=1 would save another ~0.5 s but slows the server down; not used.
# - Fast stop (SIGTERM: ~0.5 s instead of ~5 s): -Dcassandra.shutdown_announce_in_ms=0 and
#   -Dcassandra.test.messagingService.nonGracefulShutdown=true (no peers to be polite to).
# - Durability: see CASSANDRA_DURABILITY below. With Cassandra's default periodic commitlog sync a
#   SIGKILL lost 85 of 200 acknowledged rows; the default here (batch sync) lost none.
# - -Dcassandra-foreground=yes keeps the JVM's stdout/stderr open (they go to DATA_DIR/logs/stdout.log);
#   without it CassandraDaemon closes them after start-up.
# - Ports: an explicit flag wins; otherwise the ports saved in DATA_DIR/ports by the previous start
#   on that data dir are reused when still free (a restarted node keeps its identity, its clients
#   their port); otherwise free ports are picked. JMX listens on 127.0.0.1 only (local JMX).
#
# Environment:
#   SETTLE_CACHE              cache root (default <repo>/.cache); jars go to $SETTLE_CACHE/cassandra/lib
#   SETTLE_PORT_RANGE         LOW-HIGH: pick free ports in this range (default 10000 up to the ephemeral range)
#   CASSANDRA_VERSION         cassandra-all version (default: first of 5.0.9 5.0.8 ... 5.0.4 that resolves)
#   CASSANDRA_HEAP            -Xmx (default 1g; -Xms is 256m)
#   CASSANDRA_START_TIMEOUT   seconds to wait for CQL (default 180)
#   CASSANDRA_STOP_TIMEOUT    seconds between SIGTERM and SIGKILL (default 60)
#   CASSANDRA_DURABILITY      process (default) | disk | periodic: see commitlog_yaml below
#   CASSANDRA_CDS             1 (default) to use/create the AppCDS archive, 0 to disable
#   CASSANDRA_JVM_OPTS        extra JVM options, appended (word-split)
#   JAVA / JAVA_HOME          java to use (default java from JAVA_HOME or PATH)
#   PYTHON                    the python of the readiness check, which imports cassandra-driver (default
#                             python3 from PATH). settle (engine/verify/servers.py: tests, `settle bench`,
#                             chaos runs) sets it to the interpreter it runs under, where the driver is
#                             installed even in a virtualenv that is not activated; by hand, set it to that
#                             virtualenv's python.
# Files in DATA_DIR: node.conf (node options), conf/ (generated each start), data/ commitlog/ hints/ saved_caches/, logs/system.log,
# logs/stdout.log (JVM output), cassandra.pid, cql.port, ports ("cql storage jmx").
# Exit codes: 0 ok, 1 failure (start prints the log tail), 2 usage, 3 status: not running.
set -euo pipefail

SERVICE=cassandra
GROUP_ID=org.apache.cassandra
ARTIFACT_ID=cassandra-all
VERSION_PIN="${CASSANDRA_VERSION:-}"
CANDIDATE_VERSIONS="${CASSANDRA_VERSION:-5.0.9 5.0.8 5.0.7 5.0.6 5.0.5 5.0.4}"
MAIN_CLASS=CassandraDaemon
STOP_TIMEOUT="${CASSANDRA_STOP_TIMEOUT:-60}"
LOG_FILES=(system.log stdout.log)
# shellcheck source=../lib/jvm-service.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/jvm-service.sh"
CDS_ARCHIVE="$CACHE_DIR/cassandra.jsa"

after_fetch() { rm -f "$CDS_ARCHIVE"; }  # an archive of the old jars' classes is useless

# A clean exit of a CDS-recording run leaves an archive: publish it for the next starts.
after_stop() {
    local dir="$1"
    if [[ -s "$dir/cassandra.jsa.tmp" ]]; then
        if [[ ! -s "$CDS_ARCHIVE" ]]; then
            mv -f "$dir/cassandra.jsa.tmp" "$CDS_ARCHIVE.$$" && mv -f "$CDS_ARCHIVE.$$" "$CDS_ARCHIVE"
        else
            rm -f "$dir/cassandra.jsa.tmp"
        fi
    fi
}

describe_running() {
    local ADDRESS=""
    # shellcheck disable=SC1091
    if [[ -f "$1/node.conf" ]]; then source "$1/node.conf"; fi
    echo "CQL ${ADDRESS:-$HOST}:$(cat "$1/cql.port" 2>/dev/null)"
}

# ---------------------------------------------------------------------------------------------- config

# CASSANDRA_DURABILITY: what an acknowledged write survives.
#   process (default): commitlog_sync batch, fsync skipped (-Dcassandra.skip_sync=true): every acked
#                      write is in the commitlog (page cache) before the ack, so it survives SIGKILL
#                      of the JVM, not a kernel crash. Fast: no fsync.
#   disk:              commitlog_sync batch with real fsync (about 2 ms a write here).
#   periodic:          Cassandra's own default (fsync every 10 s): a SIGKILL loses the acked writes
#                      since the last sync (measured: 85 of 200 rows lost).
commitlog_yaml() {
    case "${CASSANDRA_DURABILITY:-process}" in
        process | disk) echo "commitlog_sync: batch" ;;
        periodic) printf 'commitlog_sync: periodic\ncommitlog_sync_period: 10000ms\n' ;;
        *) die "CASSANDRA_DURABILITY must be process, disk or periodic, not '$CASSANDRA_DURABILITY'" ;;
    esac
}

write_yaml() {  # $1 data dir, $2 cql, $3 storage
    local d="$1"
    cat >"$d/conf/cassandra.yaml" <<EOF
# Generated by ops/cassandra/cassandra.sh: a node on $HOST, for tests and local runs.
cluster_name: $CLUSTER_NAME
num_tokens: 16
auto_bootstrap: false
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: $(if [[ -n "$DC" ]]; then echo GossipingPropertyFileSnitch; else echo SimpleSnitch; fi)
dynamic_snitch: false
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$(seed_list "$3")"
listen_address: $HOST
rpc_address: $HOST
storage_port: $3
start_native_transport: true
native_transport_port: $2

data_file_directories:
  - $d/data
commitlog_directory: $d/commitlog
saved_caches_directory: $d/saved_caches
hints_directory: $d/hints
cdc_raw_directory: $d/cdc_raw
cdc_enabled: false

$(commitlog_yaml)
commitlog_segment_size: 16MiB
commitlog_total_space: 256MiB

$(auth_yaml)
$(tls_yaml)

# Small and quiet: a test server, not a production one.
memtable_allocation_type: heap_buffers
memtable_heap_space: 128MiB
memtable_offheap_space: 128MiB
memtable_flush_writers: 1
concurrent_reads: 8
concurrent_writes: 16
concurrent_counter_writes: 8
concurrent_compactors: 1
key_cache_size: 16MiB
row_cache_size: 0MiB
counter_cache_size: 8MiB
prepared_statements_cache_size: 16MiB
hinted_handoff_enabled: false
auto_snapshot: false
incremental_backups: false
snapshot_before_compaction: false
trickle_fsync: false
disk_failure_policy: stop
commit_failure_policy: stop
EOF
}

seed_list() {  # $1 storage port: "A:P,B:P"; a node alone is its own seed
    local seeds="${SEEDS:-$HOST}" out="" a
    IFS=, read -r -a seeds <<<"$seeds"
    for a in "${seeds[@]}"; do out+="${out:+,}$a:$1"; done
    echo "$out"
}

auth_yaml() {
    if [[ "$AUTH" == 1 ]]; then
        # Roles live in system_auth; cluster.sh replicates it to every node of the DC before it creates them.
        printf 'authenticator: PasswordAuthenticator\nauthorizer: CassandraAuthorizer\nrole_manager: CassandraRoleManager\n'
    else
        printf 'authenticator: AllowAllAuthenticator\nauthorizer: AllowAllAuthorizer\n'
    fi
}

tls_yaml() {  # client-to-node TLS, required (optional: false): a plain-text client is refused
    [[ -n "$TLS_DIR" ]] || return 0
    cat <<YAML
client_encryption_options:
  enabled: true
  optional: false
  keystore: $TLS_DIR/$HOST.p12
  keystore_password: $(cat "$TLS_DIR/keystore.password")
  store_type: PKCS12
  require_client_auth: false
YAML
}

write_logback() {  # $1 data dir
    cat >"$1/conf/logback.xml" <<EOF
<!-- Generated by ops/cassandra/cassandra.sh -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>$1/logs/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>$1/logs/system.log.%i.zip</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>20MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <root level="WARN">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
EOF
}

# From Cassandra 5.0 conf/jvm17-server.options (JPMS + Netty) and jvm-server.options.
JVM17_OPTS=(
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 -XX:InitiatingHeapOccupancyPercent=70
    -Djdk.attach.allowAttachSelf=true
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    -Dio.netty.tryReflectionSetAccessible=true
    -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    -ea -da:net.openhft... -XX:+UseThreadPriorities -Xss256k
    -XX:+UseTLAB -XX:+ResizeTLAB -XX:+PerfDisableSharedMem -Djava.net.preferIPv4Stack=true
)

# ----------------------------------------------------------------------------------------------- start

# Ready = the node answers CQL on HOST:port. A node with --auth answers a login it cannot know with an
# authentication error: that is an answer too (the probe holds no password); it then prints "auth".
wait_for_cql() {  # $1 data dir, $2 pid, $3 port, $4 timeout seconds
    "$PYTHON" - "$2" "$3" "$4" "$HOST" "$AUTH" "${TLS_DIR:+$TLS_DIR/ca.pem}" <<'EOF'
import os, ssl, sys, time, warnings
warnings.simplefilter("ignore")
pid, port, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
host, auth, ca = sys.argv[4], sys.argv[5] == "1", sys.argv[6]
try:
    from cassandra import AuthenticationFailed
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster, NoHostAvailable
except ImportError:
    sys.exit("cassandra-driver is not installed: pip install cassandra-driver")
import logging
logging.getLogger("cassandra").setLevel(logging.CRITICAL)
options = {}
if auth:
    options["auth_provider"] = PlainTextAuthProvider("readiness-probe", "-")
if ca:
    options["ssl_context"] = ssl.create_default_context(cafile=ca)

def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if not alive():
        sys.exit(f"the Cassandra JVM (pid {pid}) exited during start-up")
    cluster = Cluster([host], port=port, protocol_version=4, connect_timeout=2,
                      control_connection_timeout=2, schema_metadata_enabled=False,
                      token_metadata_enabled=False, **options)
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local", timeout=5).one()
        print(row.release_version)
        sys.exit(0)
    except NoHostAvailable as e:
        errors = e.errors.values() if isinstance(e.errors, dict) else ()
        if auth and errors and all(isinstance(r, AuthenticationFailed) for r in errors):
            print("auth")
            sys.exit(0)
        time.sleep(0.1)
    except Exception:
        time.sleep(0.1)
    finally:
        cluster.shutdown()
sys.exit(f"CQL did not answer on {host}:{port} within {timeout:.0f} s")
EOF
}

cmd_start() {
    [[ $# -ge 1 ]] || usage
    local dir="$1"; shift
    local cql="" storage="" jmx="" node_options=0
    ADDRESS="" SEEDS="" CLUSTER_NAME="" DC="" AUTH=0 TLS_DIR=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --cql-port) cql="$2"; shift 2 ;;
            --storage-port) storage="$2"; shift 2 ;;
            --jmx-port) jmx="$2"; shift 2 ;;
            --address) ADDRESS="$2"; node_options=1; shift 2 ;;
            --seeds) SEEDS="$2"; node_options=1; shift 2 ;;
            --cluster-name) CLUSTER_NAME="$2"; node_options=1; shift 2 ;;
            --dc) DC="$2"; node_options=1; shift 2 ;;
            --auth) AUTH=1; node_options=1; shift ;;
            --tls-dir) TLS_DIR="$(cd "$2" && pwd)"; node_options=1; shift 2 ;;
            *) die "start: unknown option '$1' (expected --cql-port, --storage-port, --jmx-port, --address, --seeds, --cluster-name, --dc, --auth, --tls-dir)" ;;
        esac
    done
    commitlog_yaml >/dev/null  # validates CASSANDRA_DURABILITY before anything starts
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if (( node_options )); then
        printf 'ADDRESS=%q SEEDS=%q CLUSTER_NAME=%q DC=%q AUTH=%q TLS_DIR=%q\n' \
            "$ADDRESS" "$SEEDS" "$CLUSTER_NAME" "$DC" "$AUTH" "$TLS_DIR" >"$dir/node.conf"
    elif [[ -f "$dir/node.conf" ]]; then
        # shellcheck disable=SC1091
        source "$dir/node.conf"  # a restart: the same node as last time
    fi
    HOST="${ADDRESS:-127.0.0.1}"
    CLUSTER_NAME="${CLUSTER_NAME:-settle-test}"
    [[ "$HOST" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "start: --address must be an IPv4 address of this host (127.0.0.x, or one a test put on a veth it made), not '$HOST'"
    if [[ -n "$TLS_DIR" && ! -f "$TLS_DIR/$HOST.p12" ]]; then
        die "start: --tls-dir $TLS_DIR has no keystore $HOST.p12 for this node (ops/cassandra/cluster.sh makes them)"
    fi

    local pid
    pid="$(read_pid "$dir")"
    if alive "$pid"; then
        die "start: Cassandra is already running on $dir (pid $pid, CQL port $(cat "$dir/cql.port" 2>/dev/null)); run '$0 stop $dir' first"
    fi

    cmd_fetch
    local version
    version="$(installed_version)"

    # Ports: flag > the ports this data dir used last time (if still free) > fresh free ports.
    local saved_cql="" saved_storage="" saved_jmx=""
    if [[ -f "$dir/ports" ]]; then
        read -r saved_cql saved_storage saved_jmx <"$dir/ports" || true
    fi
    local fresh
    read -r -a fresh <<<"$(free_ports 3)"
    pick() {  # $1 explicit, $2 saved, $3 fresh
        if [[ -n "$1" ]]; then echo "$1"
        elif [[ -n "$2" ]] && port_free "$2"; then echo "$2"
        else echo "$3"; fi
    }
    cql="$(pick "$cql" "$saved_cql" "${fresh[0]}")"
    storage="$(pick "$storage" "$saved_storage" "${fresh[1]}")"
    jmx="$(pick "$jmx" "$saved_jmx" "${fresh[2]}")"
    for p in "$cql" "$storage" "$jmx"; do
        port_free "$p" || die "start: port $HOST:$p is already in use"
    done

    mkdir -p "$dir"/{conf,logs,data,commitlog,saved_caches,hints,cdc_raw,triggers}
    write_yaml "$dir" "$cql" "$storage"
    if [[ -n "$DC" ]]; then
        printf 'dc=%s\nrack=rack1\n' "$DC" >"$dir/conf/cassandra-rackdc.properties"
    fi
    write_logback "$dir"
    echo "$cql $storage $jmx" >"$dir/ports"
    echo "$cql" >"$dir/cql.port"
    rm -f "$dir/cassandra.pid"

    local jamm=("$LIB_DIR"/jamm-*.jar)
    local opts=(
        -Xms256m "-Xmx${CASSANDRA_HEAP:-1g}"
        "${JVM17_OPTS[@]}"
        "-javaagent:${jamm[0]}"
        -XX:+ExitOnOutOfMemoryError
        "-Dcassandra.config=file://$dir/conf/cassandra.yaml"
        "-Dcassandra.storagedir=$dir"
        "-Dcassandra.logdir=$dir/logs"
        "-Dlogback.configurationFile=file://$dir/conf/logback.xml"
        -Dcassandra-foreground=yes
        "-Dcassandra.jmx.local.port=$jmx"
        -Dcom.sun.management.jmxremote.authenticate=false
        "-Dcom.sun.management.jmxremote.rmi.port=$jmx"
        "-Djava.rmi.server.hostname=$HOST"
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        -Dcassandra.ring_delay_ms=1000
        -Dcassandra.load_ring_state=false
        -Dcassandra.skip_schema_check=true
        -Dcassandra.memtable.row_overhead_size=181
        -Dcassandra.shutdown_announce_in_ms=0
        -Dcassandra.test.messagingService.nonGracefulShutdown=true
        "-Dcassandra.triggers_dir=$dir/triggers"
        "-Dcassandra-rackdc.properties=file://$dir/conf/cassandra-rackdc.properties"
    )
    if [[ "$AUTH" == 1 && -n "$SEEDS" ]]; then
        # The default superuser is written once, by the node that owns its token; wait until the nodes
        # started together have joined the ring, or two of them could each think they own it.
        opts+=(-Dcassandra.superuser_setup_delay_ms="${CASSANDRA_SUPERUSER_DELAY_MS:-5000}")
    fi
    if [[ "$AUTH" != 1 || -z "$SEEDS" ]]; then
        opts+=(-Dcassandra.superuser_setup_delay_ms=0)
    fi
    if [[ "${CASSANDRA_DURABILITY:-process}" == process ]]; then
        opts+=(-Dcassandra.skip_sync=true)
    fi
    # Class-data sharing: the first run that ends with a clean stop dumps the classes it loaded;
    # later starts map them instead of parsing ~10k classes from jars again.
    if [[ "${CASSANDRA_CDS:-1}" == 1 ]]; then
        if [[ -s "$CDS_ARCHIVE" ]]; then
            opts+=("-XX:SharedArchiveFile=$CDS_ARCHIVE")
        else
            opts+=("-XX:ArchiveClassesAtExit=$dir/cassandra.jsa.tmp")
        fi
        # jamm is a java agent: the JVM refuses to dump an archive with an agent unless told to.
        opts+=(-XX:+UnlockDiagnosticVMOptions -XX:+AllowArchivingWithJavaAgent -Xlog:cds=off -Xlog:cds+dynamic=off)
    fi
    # shellcheck disable=SC2206
    opts+=(${CASSANDRA_JVM_OPTS:-})

    local started
    started="$(date +%s.%N)"
    # setsid: the JVM gets its own session, so a Ctrl-C aimed at the caller does not reach it.
    setsid "$JAVA" "${opts[@]}" -cp "$LIB_DIR/*" org.apache.cassandra.service.CassandraDaemon \
        </dev/null >"$dir/logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/cassandra.pid"

    local release
    if ! release="$(wait_for_cql "$dir" "$pid" "$cql" "${CASSANDRA_START_TIMEOUT:-180}")"; then
        log "start: Cassandra failed to start (data dir $dir)"
        log_tail "$dir"
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        exit 1
    fi
    local elapsed
    elapsed="$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$started" "$(date +%s.%N)")"
    if [[ "$release" == auth ]]; then release="$version (login required)"; fi
    echo "cassandra $release (jars $version) pid $pid listening on $HOST cql=$cql storage=$storage jmx=$jmx${TLS_DIR:+ tls}; ready in ${elapsed} s"
}

dispatch "$@"
