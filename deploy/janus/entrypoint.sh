#!/bin/sh
# Start Janus with this directory's config plus the values that must not live in the repository.
#
# Why a script: Janus reads its api_secret, admin_secret and the VideoRoom admin_key only from its
# config files (or, for some, the command line, which every process that lists processes can read).
# So the config is completed on a private tmpfs (umask 077) and Janus reads it from there.
#
# Environment:
#   JANUS_API_SECRET, JANUS_ADMIN_SECRET, JANUS_ROOM_ADMIN_KEY
#                       required; at least 32 characters of A-Z a-z 0-9 _ - (openssl rand -hex 32);
#                       the broker gets the same three (BROKER_JANUS_API_SECRET, ...)
#   JANUS_API_HOST      optional: a name (or IPv4 address) for this container on the private
#                       network the broker shares with it; the API and admin API bind to that
#                       address only
#   JANUS_MEDIA_ON_API_ADDRESS
#                       optional, true or false (default): true when JANUS_API_HOST's address also
#                       carries media, as with host networking (deploy/k8s/janus.yaml), where the
#                       node's one address is both; false keeps that address out of ICE gathering
#   JANUS_PUBLIC_IP     optional: the public IPv4 address browsers reach the RTP ports at, when this
#                       host is behind 1:1 NAT or Janus runs in a container network (Janus's nat_1_1)
#   JANUS_CONFIG_DIR    the committed config files (default /etc/janus-deploy)
#   JANUS_RUNTIME_DIR   writable private directory (default /tmp)
set -eu

source_dir="${JANUS_CONFIG_DIR:-/etc/janus-deploy}"
run_dir="${JANUS_RUNTIME_DIR:-/tmp}"

for name in JANUS_API_SECRET JANUS_ADMIN_SECRET JANUS_ROOM_ADMIN_KEY; do
  eval "value=\${$name:-}"
  case "$value" in
    *[!A-Za-z0-9_-]*) echo "$name may hold only A-Z a-z 0-9 _ - (openssl rand -hex 32)" >&2; exit 64 ;;
  esac
  if [ "${#value}" -lt 32 ]; then
    echo "$name is missing or shorter than 32 characters (openssl rand -hex 32)" >&2
    exit 64
  fi
done
unset value

api_address=""
if [ -n "${JANUS_API_HOST:-}" ]; then
  api_address="$(getent ahostsv4 "$JANUS_API_HOST" | awk 'NR == 1 { print $1 }')"
  if [ -z "$api_address" ]; then
    echo "JANUS_API_HOST does not resolve to an IPv4 address" >&2
    exit 64
  fi
fi
case "${JANUS_MEDIA_ON_API_ADDRESS:-false}" in
  true | false) ;;
  *) echo "JANUS_MEDIA_ON_API_ADDRESS must be true or false" >&2; exit 64 ;;
esac
nat=""
if [ -n "${JANUS_PUBLIC_IP:-}" ]; then
  case "$JANUS_PUBLIC_IP" in
    *[!0-9.]*) echo "JANUS_PUBLIC_IP must be an IPv4 address" >&2; exit 64 ;;
  esac
  nat="--nat-1-1=$JANUS_PUBLIC_IP"
fi

umask 077
conf="$run_dir/janus-conf"
mkdir -p "$conf"
# awk reads the secrets from its environment (ENVIRON), never from its arguments.
awk '{ print } /^general: \{/ {
  printf "\tapi_secret = \"%s\"\n\tadmin_secret = \"%s\"\n", ENVIRON["JANUS_API_SECRET"], ENVIRON["JANUS_ADMIN_SECRET"]
}' "$source_dir/janus.jcfg" > "$conf/janus.jcfg"
awk '{ print } /^general: \{/ { printf "\tadmin_key = \"%s\"\n", ENVIRON["JANUS_ROOM_ADMIN_KEY"] }' \
  "$source_dir/janus.plugin.videoroom.jcfg" > "$conf/janus.plugin.videoroom.jcfg"
API_ADDRESS="$api_address" awk '{ print }
  ENVIRON["API_ADDRESS"] != "" && /^general: \{/ { printf "\tip = \"%s\"\n", ENVIRON["API_ADDRESS"] }
  ENVIRON["API_ADDRESS"] != "" && /^admin: \{/ { printf "\tadmin_ip = \"%s\"\n", ENVIRON["API_ADDRESS"] }' \
  "$source_dir/janus.transport.http.jcfg" > "$conf/janus.transport.http.jcfg"

# Media candidates only on the public side: never offer the private API network's address for ICE,
# unless it is the one address media arrives at too (host networking).
ignore="vmnet"
if [ -n "$api_address" ] && [ "${JANUS_MEDIA_ON_API_ADDRESS:-false}" = false ]; then
  ignore="vmnet,$api_address"
fi

unset JANUS_API_SECRET JANUS_ADMIN_SECRET JANUS_ROOM_ADMIN_KEY
# Extra arguments (for example a different --debug-level) go to Janus unchanged.
# shellcheck disable=SC2086 # $nat is empty or one word
exec janus --configs-folder="$conf" --config="$conf/janus.jcfg" --disable-colors \
  --ice-ignore-list="$ignore" $nat "$@"
