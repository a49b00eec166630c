#!/usr/bin/env bash
# Provision one broker user: password, ACL block and a client certificate.
#
#   deploy/mosquitto/provision-device.sh [options] ID
#
#   ID            the username; for a device also its device id (mw-cli node --id ID)
#   -r ROLE       device (default), verifier, monitor, operator, bridge or relay
#   -d DIR        broker config dir holding passwd and acl (default /etc/mosquitto/mw)
#   -c CA_DIR     dir with ca.crt and ca.key from make-test-ca.sh (default: DIR)
#   -p PASSWORD   the password (default: $MW_PASSWORD, else 24 random bytes)
#   -P PREFIX     topic prefix (default mw/v1)
#   -H HOST       broker host written into the generated env file (default broker.lan)
#
# Writes, replacing an earlier provisioning of the same ID:
#   DIR/passwd                      salted hash (mosquitto_passwd -b)
#   DIR/acl                         a "# >>> mw:ID ROLE" ... "# <<< mw:ID" block
#   DIR/clients/ID/ID.key, ID.crt   client key and certificate (CN=ID, clientAuth)
#   DIR/clients/ID/ca.crt           the CA certificate to verify the broker
#   DIR/clients/ID/password         the password, mode 0600
#   DIR/clients/ID/mw.env           MW_* settings for the systemd unit's EnvironmentFile
# then reload the broker (systemctl reload mosquitto) to apply them.
# Copy DIR/clients/ID/ to the client (e.g. /etc/mw/node-ID.env and
# /etc/mw/tls/); never copy ca.key.  The password is passed to
# mosquitto_passwd on its command line: run this on the broker, not on a
# shared multi-user host.  Needs: openssl, mosquitto_passwd.
set -euo pipefail

role=device
dir=/etc/mosquitto/mw
ca_dir=
password=${MW_PASSWORD:-}
prefix=mw/v1
host=broker.lan
usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while getopts "r:d:c:p:P:H:h" opt; do
  case "$opt" in
    r) role=$OPTARG ;;
    d) dir=$OPTARG ;;
    c) ca_dir=$OPTARG ;;
    p) password=$OPTARG ;;
    P) prefix=$OPTARG ;;
    H) host=$OPTARG ;;
    h) usage 0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 1 ]] || usage
id=$1
ca_dir=${ca_dir:-$dir}

die() { echo "provision-device.sh: $*" >&2; exit 1; }
# Mosquitto 2 reads its files after dropping root to the mosquitto user.
broker_readable() {
  if [[ $EUID -eq 0 ]] && getent group mosquitto >/dev/null; then
    chgrp mosquitto "$@" && chmod 0640 "$@"
  fi
}
# Same rule as middleware.protocol.codec.check_id: the id is a topic level.
[[ $id =~ ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$ ]] || die "invalid id '$id' (1-64 of A-Za-z0-9_.:- )"
[[ $prefix =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] || die "invalid prefix '$prefix'"
[[ -s $ca_dir/ca.crt && -s $ca_dir/ca.key ]] || die "no ca.crt/ca.key in $ca_dir (run make-test-ca.sh)"
command -v openssl >/dev/null || die "openssl not found"
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (apt-get install mosquitto)"

p=$prefix
# Home Assistant discovery node id of this client (middleware.protocol.topics.ha_node_id):
# "<prefix>_<kind>_<id>" with every character outside [A-Za-z0-9_-] made "_".
ha_node() { printf '%s_%s_%s' "$p" "$1" "$id" | sed 's/[^A-Za-z0-9_-]/_/g'; }
case "$role" in
  # A device's rights come from the ACL's `pattern` lines (%u = its username =
  # its device id): its own status and inbox, and its own sessions
  # ($p/session/<id>/+/...).  Its block only records that it was provisioned.
  # NOT closed by this file (Mosquitto 2.0.11, test_security.py): any user may
  # join the verifiers' share group; a turn its member may not read is dropped,
  # not handed to another verifier.  See docs/threat-model.md.
  device) rules="# device: rights from the pattern lines (own status, inbox, sessions)
topic write homeassistant/+/$(ha_node device)/+/config" ;;
  verifier) rules="topic deny $p/device/$id/#
topic deny $p/session/$id/#
topic read $p/session/+/+/open
topic read $p/session/+/+/draft
topic write $p/session/+/+/verdict
topic write $p/session/+/+/state
topic write $p/verifier/$id/status
topic write homeassistant/+/$(ha_node verifier)/+/config" ;;
  monitor) rules="topic deny $p/device/$id/#
topic deny $p/session/$id/#
topic read $p/#
topic read \$SYS/#
topic read homeassistant/#" ;;
  operator) rules="topic deny $p/device/$id/#
topic deny $p/session/$id/#
topic read $p/#
topic write $p/device/+/inbox
topic readwrite homeassistant/#" ;;
  bridge) rules="topic deny $p/device/$id/#
topic deny $p/session/$id/#
topic write $p/session/+/+/open
topic write $p/session/+/+/draft
topic write $p/session/+/+/text
topic write $p/session/+/+/result
topic read $p/session/+/+/verdict
topic read $p/session/+/+/state
topic write $p/device/+/status
topic read $p/device/+/inbox
topic read $p/verifier/+/status" ;;
  relay) rules="topic deny $p/device/$id/#
topic deny $p/session/$id/#
topic readwrite $p/#" ;;
  *) die "unknown role '$role' (device, verifier, monitor, operator, bridge, relay)" ;;
esac

mkdir -p "$dir"
umask 077
if [[ -z $password ]]; then
  password=$(openssl rand -base64 24 | tr -d '/+=\n')
fi
# It goes unquoted into an EnvironmentFile: no spaces, quotes, backslashes or $.
[[ $password =~ ^[A-Za-z0-9._~!@%^*()+=,:-]{8,}$ ]] \
  || die "password: at least 8 of A-Za-z0-9 and ._~!@%^*()+=,:- (no spaces, quotes, \\ or \$)"

# --- password --------------------------------------------------------------------
[[ -e $dir/passwd ]] || : > "$dir/passwd"
mosquitto_passwd -b "$dir/passwd" "$id" "$password"

# --- ACL: replace this id's marked block ------------------------------------------
acl=$dir/acl
[[ -e $acl ]] || : > "$acl"
tmp=$(mktemp "$dir/.acl.XXXXXX")
awk -v id="$id" '
  $0 == "# >>> mw:" id || index($0, "# >>> mw:" id " ") == 1 { skip = 1; next }
  skip && $0 == "# <<< mw:" id { skip = 0; next }
  skip { next }
  $0 == "" && blank { next }  # a removed block leaves no double blank line
  { blank = ($0 == ""); print }
' "$acl" > "$tmp"
if [[ -s $tmp ]]; then
  [[ -z $(tail -c1 "$tmp") ]] || echo >> "$tmp"  # end the last line
  [[ -z $(tail -n1 "$tmp") ]] || echo >> "$tmp"  # one blank line between blocks
fi
{
  echo "# >>> mw:$id $role"
  echo "user $id"
  echo "$rules"
  echo "# <<< mw:$id"
} >> "$tmp"
mv "$tmp" "$acl"
broker_readable "$dir/passwd" "$acl"

# --- client certificate -----------------------------------------------------------
out=$dir/clients/$id
mkdir -p "$out"
openssl ecparam -name prime256v1 -genkey -noout -out "$out/$id.key"
openssl req -new -key "$out/$id.key" -subj "/CN=$id" -out "$out/$id.csr"
printf '%s\n' "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature,keyAgreement" "extendedKeyUsage=clientAuth" > "$out/$id.ext"
openssl x509 -req -in "$out/$id.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" -sha256 \
  -days 825 -set_serial "0x$(openssl rand -hex 16)" -extfile "$out/$id.ext" \
  -out "$out/$id.crt" 2>/dev/null
rm -f "$out/$id.csr" "$out/$id.ext"
cp "$ca_dir/ca.crt" "$out/ca.crt"
chmod 0644 "$out/$id.crt" "$out/ca.crt"
printf '%s\n' "$password" > "$out/password"

# Settings for the systemd units (EnvironmentFile=); TLS file paths are set by
# the units themselves (LoadCredential=), so they are not repeated here.
{
  echo "# mw-cli settings for $id ($role), generated by provision-device.sh"
  echo "MW_BUS_HOST=$host"
  echo "MW_BUS_PORT=8883"
  echo "MW_BUS_PREFIX=$prefix"
  echo "MW_BUS_USERNAME=$id"
  echo "MW_BUS_PASSWORD=$password"
  case "$role" in
    device) echo "MW_NODE_ID=$id" ;;
    verifier) echo "MW_VERIFIER_ID=$id" ;;
  esac
} > "$out/mw.env"

echo "provisioned $role '$id': $out/"
echo "reload the broker to apply: systemctl reload mosquitto (SIGHUP re-reads passwd and acl)"
