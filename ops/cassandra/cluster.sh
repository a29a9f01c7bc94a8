#!/usr/bin/env bash
# Run an N-node Apache Cassandra 5.0 cluster on this box, the way production runs ScyllaDB: logins
# (PasswordAuthenticator), client-to-node TLS that clients must use, one datacenter "dc1" for
# NetworkTopologyStrategy. Each node is a cassandra.sh node with its own data dir on its own loopback
# address (127.0.0.1, 127.0.0.2, ...), all on the same CQL and storage ports (as ccm does it).
#
#   cluster.sh start DIR [--nodes N] [--addresses A,B,...]
#   cluster.sh stop DIR
#   cluster.sh status DIR
#
# A node alone: ops/cassandra/cassandra.sh {start,stop,status} DIR/nodeK (a start with no options is the
# same node again: same address, ports, keystore). SIGKILL one: kill -9 $(cat DIR/nodeK/cassandra.pid).
#
# What start leaves in DIR (all 0600/0700, throw-away, made fresh for each new DIR):
#   tls/ca.pem            the CA clients trust (store.cassandra.tls_ca_file); tls/ca.key signs the nodes'
#   tls/A.p12             node A's PKCS12 keystore: key + certificate with subjectAltName IP:A
#   settle.password       the password of role "settle" (LOGIN, CREATE ON ALL KEYSPACES; it owns what it creates)
#   admin.password        the superuser "cassandra"'s password (changed from the well-known default)
#   client.json           what a client needs: contact_points, port, local_dc, username, password_file, tls_ca_file
#   ports                 "cql storage jmx1 jmx2 ..."; nodeK/ each node's cassandra.sh data dir
# Setup, once per DIR, after every node is up and sees the others: system_auth gets
# NetworkTopologyStrategy {dc1: min(N, 3)} (the default RF 1 would lose every login held
# by a dead node), the superuser gets a random password, then role "settle" is made.
#
# Environment: those of cassandra.sh (CASSANDRA_HEAP defaults to 512m here), CLUSTER_READY_TIMEOUT
# (seconds until every node sees every other and the superuser can log in, default 180).
# Exit codes: 0 ok, 1 failure, 2 usage, 3 status: not every node is running.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODE_SCRIPT="$HERE/cassandra.sh"
PYTHON="${PYTHON:-python3}"
DC=dc1
export CASSANDRA_HEAP="${CASSANDRA_HEAP:-512m}"

die() { echo "cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '7,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

addresses_of() {  # $1 dir: the addresses of its nodes, one per line, in node order
    local d
    for d in "$1"/node*/; do
        ( source "$d/node.conf"; echo "$ADDRESS" )
    done
}

# ------------------------------------------------------------------------------------------------ TLS

make_tls() {  # $1 tls dir, $2.. node addresses: a throw-away CA and one keystore per node
    local tls="$1"; shift
    mkdir -p "$tls"
    chmod 700 "$tls"
    if [[ ! -s "$tls/ca.pem" ]]; then
        openssl req -x509 -newkey rsa:2048 -nodes -keyout "$tls/ca.key" -out "$tls/ca.pem" -days 30 \
            -subj "/CN=settle throw-away test CA $(date +%s)" 2>/dev/null
        openssl rand -hex 16 >"$tls/keystore.password"
    fi
    local a
    for a in "$@"; do
        [[ -s "$tls/$a.p12" ]] && continue
        openssl req -newkey rsa:2048 -nodes -keyout "$tls/$a.key" -out "$tls/$a.csr" -subj "/CN=$a" 2>/dev/null
        openssl x509 -req -in "$tls/$a.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
            -out "$tls/$a.pem" -days 30 -extfile <(printf 'subjectAltName=IP:%s\n' "$a") 2>/dev/null
        openssl pkcs12 -export -in "$tls/$a.pem" -inkey "$tls/$a.key" -certfile "$tls/ca.pem" -name node \
            -out "$tls/$a.p12" -passout "file:$tls/keystore.password"
        rm -f "$tls/$a.csr"
    done
    chmod 600 "$tls"/*
}

# ---------------------------------------------------------------------------------------------- ports

pick_ports() {  # $1 node count, $2.. addresses: "cql storage jmx1..jmxN", cql/storage free on every address
    "$PYTHON" - "$@" <<'EOF'
import socket, sys
count, addresses = int(sys.argv[1]), sys.argv[2:]

def free(host, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()

held, chosen = [], []
while len(chosen) < 2 + count:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
    port = s.getsockname()[1]
    if len(chosen) < 2 and not all(free(a, port) for a in addresses if a != "127.0.0.1"):
        continue
    chosen.append(port)
for s in held:
    s.close()
print(" ".join(map(str, chosen)))
EOF
}

# ---------------------------------------------------------------------------------------------- setup

# Waits until every node is up in every node's view, then (once per DIR) replicates the auth keyspaces
# and makes the roles. Passwords travel in files only, never on a command line.
setup_cluster() {  # $1 dir, $2 cql port, $3 node count
    "$PYTHON" - "$1" "$2" "$3" "$DC" "${CLUSTER_READY_TIMEOUT:-180}" <<'EOF'
import json, logging, os, secrets, ssl, sys, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
logging.getLogger("cassandra").setLevel(logging.CRITICAL)
from cassandra import ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy

root, port, count, dc, timeout = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
addresses = [(d / "node.conf").read_text().split("ADDRESS=")[1].split()[0] for d in sorted(root.glob("node*")) if d.is_dir()]
tls = ssl.create_default_context(cafile=str(root / "tls" / "ca.pem"))
admin_file, done = root / "admin.password", root / "setup.done"
deadline = time.monotonic() + timeout

def private(path, text):
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text + "\n")

def session_on(address, password):
    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([address]),
                               consistency_level=ConsistencyLevel.QUORUM, request_timeout=30)
    cluster = Cluster([address], port=port, protocol_version=4, ssl_context=tls,
                      auth_provider=PlainTextAuthProvider("cassandra", password),
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=5)
    try:
        return cluster, cluster.connect()
    except BaseException:
        cluster.shutdown()
        raise

def until(what, attempt):
    last = None
    while time.monotonic() < deadline:
        try:
            result = attempt()
            if result:
                return result
        except Exception as e:  # not up yet, superuser not written yet, gossip still spreading
            last = e
        time.sleep(0.5)
    sys.exit(f"cluster.sh: {what} within {timeout:.0f} s (last: {last})")

password = admin_file.read_text().strip() if done.exists() else "cassandra"

def ring_complete():
    for address in addresses:
        cluster, session = session_on(address, password)
        try:
            peers = session.execute("SELECT peer FROM system.peers_v2").all()
            if len(peers) != count - 1:
                return False
        finally:
            cluster.shutdown()
    return True

until(f"every one of the {count} nodes seeing the others", ring_complete)
if not done.exists():
    cluster, session = until("the superuser logging in", lambda: session_on(addresses[0], password))

    def run(statement, values=()):
        # Each statement is idempotent and retried: once system_auth has more replicas, the default
        # superuser is read at QUORUM from replicas that may not hold it yet ("User cassandra does not have
        # sufficient privileges"); the reads repair them.
        until(f"{statement.split(' WITH')[0]} done", lambda: session.execute(statement, values) is not None)

    try:
        rf = min(count, 3)
        for ks in ("system_auth",):
            run(f"ALTER KEYSPACE {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', '{dc}': {rf}}}")
        admin, settle = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        private(admin_file, admin)
        # A password of our own instead of the well-known default (a role may not change its own SUPERUSER).
        run("ALTER ROLE cassandra WITH PASSWORD = %s", (admin,))
        run("CREATE ROLE IF NOT EXISTS settle WITH PASSWORD = %s AND LOGIN = true", (settle,))
        run("GRANT CREATE ON ALL KEYSPACES TO settle")
        private(root / "settle.password", settle)
    finally:
        cluster.shutdown()
    done.touch()
client = {"contact_points": addresses, "port": port, "local_dc": dc, "username": "settle",
          "password_file": str(root / "settle.password"), "tls_ca_file": str(root / "tls" / "ca.pem")}
(root / "client.json").write_text(json.dumps(client, indent=2) + "\n")
EOF
}

# --------------------------------------------------------------------------------------------- commands

cmd_start() {
    [[ $# -ge 1 ]] || usage
    local dir="$1"; shift
    local count=3 addresses=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nodes) count="$2"; shift 2 ;;
            --addresses) addresses="$2"; shift 2 ;;
            *) die "start: unknown option '$1' (expected --nodes, --addresses)" ;;
        esac
    done
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "start: --nodes must be a positive integer, not '$count'"
    mkdir -p "$dir"
    chmod 700 "$dir"
    dir="$(cd "$dir" && pwd)"
    local started
    started="$(date +%s.%N)"
    "$NODE_SCRIPT" fetch >/dev/null

    local -a addr
    if [[ -f "$dir/ports" ]]; then
        mapfile -t addr < <(addresses_of "$dir")
    elif [[ -n "$addresses" ]]; then
        IFS=, read -r -a addr <<<"$addresses"
    else
        local i
        for ((i = 1; i <= count; i++)); do addr+=("127.0.0.$i"); done
    fi
    count=${#addr[@]}
    make_tls "$dir/tls" "${addr[@]}"
    [[ -f "$dir/ports" ]] || pick_ports "$count" "${addr[@]}" >"$dir/ports"
    local -a ports
    read -r -a ports <"$dir/ports"
    local seeds
    seeds="$(IFS=,; echo "${addr[*]}")"

    # All nodes start at once (each is a seed, so none waits for another to answer first).
    local k pids=() failed=0
    for ((k = 1; k <= count; k++)); do
        "$NODE_SCRIPT" start "$dir/node$k" --address "${addr[k-1]}" --seeds "$seeds" \
            --cluster-name settle-cluster --dc "$DC" --auth --tls-dir "$dir/tls" \
            --cql-port "${ports[0]}" --storage-port "${ports[1]}" --jmx-port "${ports[k+1]}" \
            >"$dir/node$k.start.log" 2>&1 &
        pids+=($!)
    done
    for ((k = 1; k <= count; k++)); do
        if ! wait "${pids[k-1]}"; then
            failed=1
            echo "----- node$k (${addr[k-1]}) did not start:" >&2
            cat "$dir/node$k.start.log" >&2
        fi
    done
    if (( failed )); then
        cmd_stop "$dir" >/dev/null 2>&1 || true
        die "start: not every node started (cluster dir $dir)"
    fi
    if ! setup_cluster "$dir" "${ports[0]}" "$count"; then
        cmd_stop "$dir" >/dev/null 2>&1 || true
        die "start: the cluster did not form (node logs: $dir/node*/logs/system.log)"
    fi
    local elapsed rss=0 pid
    elapsed="$("$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
        "$started" "$(date +%s.%N)")"
    for ((k = 1; k <= count; k++)); do
        pid="$(cat "$dir/node$k/cassandra.pid")"
        rss=$((rss + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")))
    done
    echo "cassandra cluster of $count nodes (${addr[*]}) cql=${ports[0]} tls auth dc=$DC heap=$CASSANDRA_HEAP each;" \
        "ready in ${elapsed} s; rss $((rss / 1024)) MiB in all; client settings: $dir/client.json"
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local d
    for d in "$1"/node*/; do
        [[ -d "$d" ]] || continue
        "$NODE_SCRIPT" stop "${d%/}" &
    done
    wait
}

cmd_status() {
    [[ $# -eq 1 ]] || usage
    local d rc=0
    for d in "$1"/node*/; do
        [[ -d "$d" ]] || continue
        "$NODE_SCRIPT" status "${d%/}" || rc=3
    done
    return $rc
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    *) usage ;;
esac
