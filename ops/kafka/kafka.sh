#!/usr/bin/env bash
# Run a real single-node Apache Kafka 4.x (KRaft: combined broker + controller) on 127.0.0.1 for tests
# and local runs, without Docker and without the Kafka tarball: the jars come from Maven Central.
#
#   kafka.sh fetch
#   kafka.sh start DATA_DIR [--port P] [--controller-port P] [--host ADDR]
#                 [--node-id N --voters ID@ADDR:PORT,... --cluster-id ID --replicas R]
#   kafka.sh stop DATA_DIR
#   kafka.sh status DATA_DIR
#
# What it took (verified with 4.4.0 on OpenJDK 17):
# - Jars: `mvn dependency:copy-dependencies` of org.apache.kafka:kafka_2.13 gives the broker's runtime
#   classpath (about 45 jars, 43 MB) with log4j-core but no SLF4J binding: log4j-slf4j2-impl (and the
#   slf4j-api 2.0 it needs, declared directly so it wins over kafka's 1.7.36) routes the broker's
#   logging to log4j2, configured by DATA_DIR/conf/log4j2.properties.
# - KRaft, one JVM: process.roles=broker,controller, node.id=1 and a *static* quorum
#   (controller.quorum.voters=1@127.0.0.1:CONTROLLER_PORT), storage formatted once with
#   `kafka.tools.StorageTool format --cluster-id ID` (no --standalone: that one writes the controller's
#   endpoint into the metadata log, a static voter set is read from the config on every start, so a
#   restart on another port still works). A formatted data dir (meta.properties) is not formatted again.
# - Small and quick: -Xmx512m, replication factor 1 for every internal topic,
#   offsets.topic.num.partitions=8 (not 50), group.initial.rebalance.delay.ms=0
#   (the first consumer group forms at once, not after 3 s), group.min.session.timeout.ms=1000 so tests
#   may use short consumer session timeouts, broker.session.timeout.ms=2000 (after a SIGKILL the
#   restarted broker is refused with DUPLICATE_BROKER_REGISTRATION until its old session expires: 9 s by
#   default), auto.create.topics.enable=false (settle creates its topic with the partition count it needs).
# - Durability: acks=all on one replica is acknowledged once the record is in the broker's page cache;
#   it survives SIGKILL of the JVM (the page cache is the kernel's), not a power cut. Production runs
#   three brokers, replication.factor=3, min.insync.replicas=2.
# - Ports: an explicit flag wins; otherwise the ports saved in DATA_DIR/ports by the previous start on
#   that data dir are reused when still free (clients keep the address they know); otherwise free ports.
#
# - A cluster (engine.verify.servers.KafkaCluster): each node is started with its own --host and --node-id, the
#   same static --voters (every node is broker and controller) and --cluster-id (formatted alike), and
#   --replicas R: the internal topics get R replicas and min.insync.replicas is R-1 (at least 1), so a
#   topic of R replicas keeps taking acks=all writes with one broker down. The nodes wait for each other:
#   start them at the same time (a node answers once the quorum has a leader).
#
# Environment:
#   SETTLE_CACHE           cache root (default <repo>/.cache); jars go to $SETTLE_CACHE/kafka/lib
#   SETTLE_PORT_RANGE      LOW-HIGH: pick free ports in this range (default 10000 up to the ephemeral range)
#   KAFKA_VERSION          kafka_2.13 version (default: first of 4.4.0 4.3.1 4.2.0 4.1.1 4.0.2 that resolves)
#   KAFKA_HEAP             -Xmx (default 512m; -Xms is 64m)
#   KAFKA_START_TIMEOUT    seconds to wait until the broker answers (default 120)
#   KAFKA_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL (default 30)
#   KAFKA_JVM_OPTS         extra JVM options, appended (word-split)
#   JAVA / JAVA_HOME       java to use (default java from JAVA_HOME or PATH)
#   PYTHON                 the python of the readiness check, which imports confluent-kafka (default python3
#                          from PATH). settle (engine/verify/servers.py: tests, `settle bench`) sets it to the
#                          interpreter it runs under, where confluent-kafka is installed even in a virtualenv
#                          that is not activated; by hand, set it to that virtualenv's python.
# Files in DATA_DIR: conf/server.properties, conf/log4j2.properties (generated each start), data/ (the
# log dirs; meta.properties once formatted), cluster.id, logs/server.log, logs/stdout.log, kafka.pid,
# kafka.port, ports ("broker controller").
# Exit codes: 0 ok, 1 failure (start prints the log tail), 2 usage, 3 status: not running.
set -euo pipefail

SERVICE=kafka
GROUP_ID=org.apache.kafka
ARTIFACT_ID=kafka_2.13
VERSION_PIN="${KAFKA_VERSION:-}"
CANDIDATE_VERSIONS="${KAFKA_VERSION:-4.4.0 4.3.1 4.2.0 4.1.1 4.0.2}"
MAIN_CLASS=kafka.Kafka
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
LOG_FILES=(server.log stdout.log)
LOG4J_VERSION=2.25.5
SLF4J_VERSION=2.0.17
# shellcheck source=../lib/jvm-service.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/jvm-service.sh"

extra_dependencies() {  # an SLF4J binding: the broker logs through log4j2 (see the header)
    cat <<EOF
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
EOF
}

describe_running() { echo "$(cat "$1/host" 2>/dev/null || echo "$HOST"):$(cat "$1/kafka.port" 2>/dev/null)"; }

# ---------------------------------------------------------------------------------------------- config

write_properties() {  # $1 data dir, $2 broker port, $3 controller port, $4 node id, $5 voters, $6 replicas
    local d="$1" replicas="$6" min_isr=$(( $6 > 1 ? $6 - 1 : 1 ))
    cat >"$d/conf/server.properties" <<EOF
# Generated by ops/kafka/kafka.sh: KRaft node $4 (broker + controller) on $HOST, for tests and local runs.
process.roles=broker,controller
node.id=$4
controller.quorum.voters=${5:-$4@$HOST:$3}
listeners=PLAINTEXT://$HOST:$2,CONTROLLER://$HOST:$3
advertised.listeners=PLAINTEXT://$HOST:$2
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$d/data

# Internal topics: --replicas copies (1 for a single node), one may be down.
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$min_isr
min.insync.replicas=$min_isr
default.replication.factor=$replicas
num.partitions=1
auto.create.topics.enable=false

# Consumer groups form at once; tests may use short session timeouts. A broker restarted after SIGKILL
# registers again once its previous session expired: 2 s instead of 9 s.
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.min.heartbeat.interval.ms=500

# Small and quiet: a test broker, not a production one.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.retention.hours=24
log.segment.bytes=67108864
log.retention.check.interval.ms=300000
EOF
}

write_log4j2() {  # $1 data dir
    cat >"$1/conf/log4j2.properties" <<EOF
# Generated by ops/kafka/kafka.sh
status = error
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $1/logs/server.log
appender.file.filePattern = $1/logs/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.server.name = org.apache.kafka.server
logger.server.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = kafka.controller
logger.controller.level = WARN
logger.log.name = kafka.log
logger.log.level = WARN
logger.cluster.name = kafka.cluster
logger.cluster.level = WARN
EOF
}

JVM_OPTS=(
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true
    -Xshare:auto -XX:+PerfDisableSharedMem
)

# ----------------------------------------------------------------------------------------------- start

wait_for_broker() {  # $1 pid, $2 port, $3 timeout seconds
    "$PYTHON" - "$1" "$2" "$3" "$HOST" <<'EOF'
import sys, time
pid, port, timeout, host = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
try:
    from confluent_kafka.admin import AdminClient
except ImportError:
    sys.exit("confluent-kafka is not installed: pip install confluent-kafka")

def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

admin = AdminClient({"bootstrap.servers": f"{host}:{port}", "log_level": 0,
                     "logger": __import__("logging").getLogger("quiet")})
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if not alive():
        sys.exit(f"the Kafka JVM (pid {pid}) exited during start-up")
    try:
        md = admin.list_topics(timeout=1)
        if md.brokers and md.controller_id >= 0:
            cluster = admin.describe_cluster(request_timeout=2).result(timeout=3)
            print(cluster.cluster_id)
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit(f"the broker did not answer on {host}:{port} within {timeout:.0f} s")
EOF
}

cmd_start() {
    [[ $# -ge 1 ]] || usage
    local dir="$1"; shift
    local port="" cport="" node_id=1 voters="" given_cluster_id="" replicas=1
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) port="$2"; shift 2 ;;
            --controller-port) cport="$2"; shift 2 ;;
            --host) HOST="$2"; shift 2 ;;
            --node-id) node_id="$2"; shift 2 ;;
            --voters) voters="$2"; shift 2 ;;
            --cluster-id) given_cluster_id="$2"; shift 2 ;;
            --replicas) replicas="$2"; shift 2 ;;
            *) die "start: unknown option '$1' (expected --port, --controller-port, --host, --node-id, --voters, --cluster-id, --replicas)" ;;
        esac
    done
    [[ "$replicas" =~ ^[1-9][0-9]*$ ]] || die "start: --replicas must be a positive integer (got '$replicas')"
    [[ "$node_id" =~ ^[0-9]+$ ]] || die "start: --node-id must be a number (got '$node_id')"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"

    local pid
    pid="$(read_pid "$dir")"
    if alive "$pid"; then
        die "start: Kafka is already running on $dir (pid $pid, port $(cat "$dir/kafka.port" 2>/dev/null)); run '$0 stop $dir' first"
    fi

    cmd_fetch
    local version
    version="$(installed_version)"

    # Ports: flag > the ports this data dir used last time (if still free) > fresh free ports.
    local saved_port="" saved_cport=""
    if [[ -f "$dir/ports" ]]; then
        read -r saved_port saved_cport <"$dir/ports" || true
    fi
    local fresh
    read -r -a fresh <<<"$(free_ports 2)"
    pick() {  # $1 explicit, $2 saved, $3 fresh
        if [[ -n "$1" ]]; then echo "$1"
        elif [[ -n "$2" ]] && port_free "$2"; then echo "$2"
        else echo "$3"; fi
    }
    port="$(pick "$port" "$saved_port" "${fresh[0]}")"
    cport="$(pick "$cport" "$saved_cport" "${fresh[1]}")"
    [[ "$port" != "$cport" ]] || die "start: broker and controller port are both $port"
    # A JVM killed a moment ago may still be releasing its sockets: give a port we chose 10 s.
    local p tries
    for p in "$port" "$cport"; do
        tries=0
        until port_free "$p"; do
            (( ++tries <= 100 )) || die "start: port $HOST:$p is already in use"
            sleep 0.1
        done
    done

    mkdir -p "$dir"/{conf,logs,data}
    write_properties "$dir" "$port" "$cport" "$node_id" "$voters" "$replicas"
    echo "$HOST" >"$dir/host"
    write_log4j2 "$dir"
    echo "$port $cport" >"$dir/ports"
    echo "$port" >"$dir/kafka.port"
    rm -f "$dir/kafka.pid"

    local opts=(
        -Xms64m "-Xmx${KAFKA_HEAP:-512m}"
        "${JVM_OPTS[@]}"
        "-Dlog4j2.configurationFile=file://$dir/conf/log4j2.properties"
        "-Dkafka.logs.dir=$dir/logs"
    )
    # shellcheck disable=SC2206
    opts+=(${KAFKA_JVM_OPTS:-})

    local started
    started="$(date +%s.%N)"
    if [[ ! -f "$dir/data/meta.properties" ]]; then
        local cluster_id
        if [[ -n "$given_cluster_id" ]]; then
            cluster_id="$given_cluster_id"
            echo "$cluster_id" >"$dir/cluster.id"
        elif [[ -s "$dir/cluster.id" ]]; then
            cluster_id="$(cat "$dir/cluster.id")"
        else
            # A leading '-' would be read as an option by kafka-storage (1 in 64 ids): draw again.
            cluster_id="$("$PYTHON" -c 'import base64, uuid
while True:
    text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not text.startswith("-"):
        print(text)
        break')"
            echo "$cluster_id" >"$dir/cluster.id"
        fi
        if ! "$JAVA" "${opts[@]}" -cp "$LIB_DIR/*" kafka.tools.StorageTool format \
            --config "$dir/conf/server.properties" --cluster-id "$cluster_id" \
            >"$dir/logs/format.log" 2>&1; then
            cat "$dir/logs/format.log" >&2
            die "start: formatting the KRaft storage in $dir/data failed"
        fi
    fi

    # setsid: the JVM gets its own session, so a Ctrl-C aimed at the caller does not reach it.
    setsid "$JAVA" "${opts[@]}" -cp "$LIB_DIR/*" kafka.Kafka "$dir/conf/server.properties" \
        </dev/null >"$dir/logs/stdout.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"

    local cluster
    if ! cluster="$(wait_for_broker "$pid" "$port" "${KAFKA_START_TIMEOUT:-120}")"; then
        log "start: Kafka failed to start (data dir $dir)"
        log_tail "$dir"
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        exit 1
    fi
    local elapsed
    elapsed="$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$started" "$(date +%s.%N)")"
    echo "kafka $version (cluster $cluster) pid $pid listening on $HOST:$port controller=$cport; ready in ${elapsed} s"
}

dispatch "$@"
