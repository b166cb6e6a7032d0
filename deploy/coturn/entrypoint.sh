#!/bin/sh
# Start coturn with the production config plus the values that must not live in the repository.
#
# Why a script: coturn cannot read its shared secret from a file or the environment, and a secret on
# the command line is visible to every process that can list processes. So the config is completed
# on a private tmpfs (umask 077) and coturn reads it from there.
#
# Environment:
#   TURN_SECRET_FILE  file holding the TURN REST shared secret (default /run/secrets/turn_secret)
#   TURN_REALM        realm, usually the TURN host name (required)
#   TURN_EXTERNAL_IP  public IP when the host is behind 1:1 NAT (optional)
#   TURN_CONFIG       base config (default /etc/coturn/turnserver.conf)
#   TURN_RUNTIME_DIR  writable private directory (default /tmp)
set -eu

secret_file="${TURN_SECRET_FILE:-/run/secrets/turn_secret}"
base="${TURN_CONFIG:-/etc/coturn/turnserver.conf}"
run_dir="${TURN_RUNTIME_DIR:-/tmp}"
realm="${TURN_REALM:?set TURN_REALM to the TURN host name}"

case "$realm" in
  *[!A-Za-z0-9.-]*) echo "TURN_REALM must be a host name" >&2; exit 64 ;;
esac
if [ ! -s "$secret_file" ]; then
  echo "the TURN secret file $secret_file is missing or empty" >&2
  exit 64
fi

umask 077
conf="$run_dir/turnserver.conf"
# printf is a shell builtin: the secret never appears in a process's arguments.
{
  sed -e '/^realm=/d' "$base"
  printf 'realm=%s\n' "$realm"
  printf 'static-auth-secret=%s\n' "$(tr -d '\r\n' < "$secret_file")"
  if [ -n "${TURN_EXTERNAL_IP:-}" ]; then
    printf 'external-ip=%s\n' "$TURN_EXTERNAL_IP"
  fi
  printf 'pidfile=%s\n' "$run_dir/turnserver.pid"
  printf 'userdb=%s\n' "$run_dir/turndb.sqlite"
} > "$conf"

# Extra arguments (for example --external-ip=... or test listeners) go to turnserver unchanged.
exec turnserver -c "$conf" "$@"
