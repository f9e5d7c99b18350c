#!/usr/bin/env bash
# Run a command with the servers the cluster tests need, all on loopback:
#   PostgreSQL (Debian's cluster, when installed) -> FINETUNE_LAB_TEST_PG
#   a Ray head (when ray is installed)            -> FINETUNE_LAB_TEST_RAY (its job-submission URL)
# As root, it first moves into a network namespace that has only loopback (`unshare -n`):
# Ray binds to the machine's address otherwise, and no test traffic may leave the machine.
# Both servers are stopped when the command ends. Without root or the servers, the command
# runs as it is and the tests that need them are skipped (in CI they fail instead).
set -euo pipefail
cd "$(dirname "$0")/.."
# One set of services per machine at a time: Debian's PostgreSQL cluster is one data folder,
# and `ray stop --force` ends every Ray process of the machine. A second caller (two test
# runs in two checkouts) waits here; the lock is inherited across the re-exec below.
if [ -z "${FINETUNE_LAB_SERVICES_LOCKED:-}" ] && command -v flock >/dev/null 2>&1; then
  export FINETUNE_LAB_SERVICES_LOCKED=1
  exec 9>/tmp/finetune-lab-services.lock
  flock 9
fi
if [ "${FINETUNE_LAB_IN_NETNS:-}" != 1 ] && [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  export FINETUNE_LAB_IN_NETNS=1
  exec unshare -n bash "$0" "$@"
fi
if [ "${FINETUNE_LAB_IN_NETNS:-}" = 1 ]; then
  ip link set lo up
fi

cleanup() {
  if [ -n "${RAY_STARTED:-}" ]; then .venv/bin/ray stop --force >/dev/null 2>&1 || true; fi
  if [ -n "${PG_STARTED:-}" ]; then pg_ctlcluster "$PG_CLUSTER" stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

if [ "${FINETUNE_LAB_IN_NETNS:-}" = 1 ] && command -v pg_lsclusters >/dev/null 2>&1; then
  PG_CLUSTER=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  PG_PORT=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
  if [ -n "$PG_CLUSTER" ]; then
    # shellcheck disable=SC2086
    pg_ctlcluster $PG_CLUSTER start && PG_STARTED=1
    PG_CLUSTER=${PG_CLUSTER/ /\/}  # "15 main" -> "15/main" for the stop above
    runuser -u postgres -- psql -qp "$PG_PORT" -c "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles
      WHERE rolname='finetune_test') THEN CREATE ROLE finetune_test LOGIN PASSWORD 'finetune_test'
      CREATEDB; END IF; END\$\$;"
    export FINETUNE_LAB_TEST_PG="postgresql://finetune_test:finetune_test@127.0.0.1:$PG_PORT/postgres"
  fi
fi

if [ "${FINETUNE_LAB_IN_NETNS:-}" = 1 ] && [ -x .venv/bin/ray ]; then
  # One CPU: the cluster tests run tiny jobs one at a time, beside the test process.
  .venv/bin/ray start --head --node-ip-address=127.0.0.1 --num-cpus=1 --port=6390 \
    --dashboard-host=127.0.0.1 --dashboard-port=8266 --disable-usage-stats >/dev/null
  RAY_STARTED=1
  export FINETUNE_LAB_TEST_RAY="http://127.0.0.1:8266"
fi

"$@"
