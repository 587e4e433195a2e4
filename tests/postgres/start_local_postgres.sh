#!/bin/bash
# Start a throwaway PostgreSQL server for the search's tests (tests/test_search_postgres.py) and for trying
# `--search_storage` by hand. Idempotent: run it again and it only starts what is not answering. Prints the
# superuser's URL (and writes it to $COLA_POSTGRES_DIR/url), for example
#
#   apt-get install -y postgresql          # Debian's server binaries (/usr/lib/postgresql/<version>/bin)
#   tests/postgres/start_local_postgres.sh # -> postgresql://postgres:<generated>@127.0.0.1:55432/postgres
#   tests/postgres/start_local_postgres.sh stop
#
# The server listens on 127.0.0.1 only, plus a unix socket inside its own directory, and asks every TCP
# client for a password (scram-sha-256), as a real server does: the tests put passwords in storage URLs and
# check that none is ever recorded. PostgreSQL refuses to run as root, so as root the cluster belongs to a
# dedicated system user ($COLA_POSTGRES_USER, created if missing); as anyone else it belongs to that user.
set -euo pipefail

STATE_DIR="${COLA_POSTGRES_DIR:-${TMPDIR:-/tmp}/cola-postgres}"
PORT="${COLA_POSTGRES_PORT:-55432}"
OS_USER="${COLA_POSTGRES_USER:-colapg}"
DATA_DIR="$STATE_DIR/data"
SOCKET_DIR="$STATE_DIR/socket"
PASSWORD_FILE="$STATE_DIR/superuser.password"

bin_dir="${COLA_POSTGRES_BIN:-}"
if [[ -z "$bin_dir" ]]; then
  # The newest installed server: Debian keeps each major version under /usr/lib/postgresql/<version>/bin.
  bin_dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)"
  [[ -n "$bin_dir" ]] || bin_dir="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
fi
for program in initdb pg_ctl pg_isready; do
  [[ -x "$bin_dir/$program" ]] || {
    echo "start_local_postgres: $program not found (looked in $bin_dir); apt-get install postgresql" >&2
    exit 3  # the tests skip on this status only: the server is not installed here
  }
done

# Runs a server program as the cluster's owner.
as_owner() {
  if [[ $EUID -eq 0 ]]; then
    runuser -u "$OS_USER" -- "$@"
  else
    "$@"
  fi
}

if [[ "${1:-start}" == "stop" ]]; then
  if [[ -f "$DATA_DIR/postmaster.pid" ]]; then
    as_owner "$bin_dir/pg_ctl" -D "$DATA_DIR" -m fast -w stop >/dev/null
  fi
  exit 0
fi

# One start at a time (two test processes may call this together): the rest of the script holds the lock.
mkdir -p "$(dirname "$STATE_DIR")"
exec 9>"$STATE_DIR.start-lock"
flock 9

if [[ $EUID -eq 0 ]] && ! id -u "$OS_USER" >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin "$OS_USER"
fi

mkdir -p "$STATE_DIR"
if [[ $EUID -eq 0 ]]; then
  chown "$OS_USER" "$STATE_DIR"
fi
chmod 700 "$STATE_DIR"

if [[ ! -s "$DATA_DIR/PG_VERSION" ]]; then
  rm -rf "$DATA_DIR"
  # A password for the superuser, readable by the cluster's owner (and root) only.
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$PASSWORD_FILE")
  if [[ $EUID -eq 0 ]]; then chown "$OS_USER" "$PASSWORD_FILE"; fi
  as_owner "$bin_dir/initdb" --pgdata="$DATA_DIR" --username=postgres --pwfile="$PASSWORD_FILE" \
    --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >"$STATE_DIR/initdb.log"
  cat >>"$DATA_DIR/postgresql.conf" <<EOF
# Written by tests/postgres/start_local_postgres.sh
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 200
# A test server: durability is not the point, speed is.
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
fi
mkdir -p "$SOCKET_DIR"
if [[ $EUID -eq 0 ]]; then chown "$OS_USER" "$SOCKET_DIR"; fi

if ! as_owner "$bin_dir/pg_isready" -q -h "$SOCKET_DIR" -p "$PORT"; then
  # A server killed without a clean stop leaves its pid file; pg_ctl start copes with a stale one.
  # 9>&-: the server must not inherit the start lock, or it would hold it for as long as it runs.
  as_owner "$bin_dir/pg_ctl" -D "$DATA_DIR" -l "$STATE_DIR/server.log" -w -t 60 start >/dev/null 9>&- || {
    echo "start_local_postgres: the server did not start; see $STATE_DIR/server.log" >&2
    tail -n 20 "$STATE_DIR/server.log" >&2 || true
    exit 1
  }
fi

url="postgresql://postgres:$(cat "$PASSWORD_FILE")@127.0.0.1:$PORT/postgres"
(umask 077 && echo "$url" >"$STATE_DIR/url")
echo "$url"
