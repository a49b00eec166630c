#!/usr/bin/env bash
# Provision one broker user: login, topic rights and a client certificate.
#
#   deploy/mosquitto/provision-device.sh [options] ID
#
#   ID            the username; for a device also its device id (mw-cli node --id ID)
#   -r ROLE       device (default), verifier, monitor, operator, bridge or relay;
#                 admin: bootstrap the dynamic-security state (see below)
#   -d DIR        broker config dir with the CA and clients/ (default /etc/mosquitto/mw)
#   -c CA_DIR     dir with ca.crt and ca.key from make-test-ca.sh (default: DIR)
#   -p PASSWORD   the password (default: $MW_PASSWORD, else 24 random bytes)
#   -P PREFIX     topic prefix (default mw/v1)
#   -H HOST       broker host written into the generated env file (default broker.lan)
#   -B HOST:PORT  the running broker to change, over TLS as the admin (default localhost:8883)
#   -a ADMIN      the dynamic-security admin user (default admin; its files: DIR/clients/ADMIN/)
#   -s FILE       -r admin: the plugin's state file to create
#                 (default /var/lib/mosquitto/dynamic-security.json, as in mosquitto.prod.conf)
#   -f            an edge broker with acl_file (bridge-edge.conf): write DIR/passwd and DIR/acl
#                 instead of talking to a broker (reload it afterwards)
#   -D            revoke ID: delete its user and rights (its certificate files stay)
#
# Central broker (mosquitto.prod.conf, dynamic-security plugin): once, before the
# broker's first start, `-r admin admin` creates the plugin's state file with that
# admin user (mosquitto_ctrl dynsec init) and the admin's certificate and
# password in DIR/clients/admin/ (keep them on the broker host).  Every other
# run changes the RUNNING broker through mosquitto_ctrl as that admin: a client
# ID with the password, a role "mw-ID" holding exactly ID's rights (replaced on
# re-provisioning), and the default access (deny everything not granted).
# Changes are live and saved by the plugin; no reload, no restart.  A connected
# client whose role or password changes is disconnected by the plugin and must
# reconnect (with the new password).
#
# Also writes DIR/clients/ID/: ID.key, ID.crt (CN=ID, clientAuth), ca.crt,
# password (0600) and mw.env (MW_* settings for the systemd unit's
# EnvironmentFile).  Copy that directory to the client (e.g. /etc/mw/node-ID.env
# and /etc/mw/tls/); never copy ca.key.  Passwords are passed to mosquitto_ctrl
# / mosquitto_passwd on their command line: run this on the broker host, not on
# a shared multi-user host.  Needs: openssl, mosquitto_ctrl (packages mosquitto,
# mosquitto-clients for mosquitto_rr; -f: mosquitto_passwd).
set -euo pipefail

role=device
dir=/etc/mosquitto/mw
ca_dir=
password=${MW_PASSWORD:-}
prefix=mw/v1
host=broker.lan
target=localhost:8883
admin=admin
state=/var/lib/mosquitto/dynamic-security.json
file_mode=false
revoke=false
usage() { sed -n '2,39p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while getopts "r:d:c:p:P:H:B:a:s:fDh" opt; do
  case "$opt" in
    r) role=$OPTARG ;;
    d) dir=$OPTARG ;;
    c) ca_dir=$OPTARG ;;
    p) password=$OPTARG ;;
    P) prefix=$OPTARG ;;
    H) host=$OPTARG ;;
    B) target=$OPTARG ;;
    a) admin=$OPTARG ;;
    s) state=$OPTARG ;;
    f) file_mode=true ;;
    D) revoke=true ;;
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
[[ $admin =~ ^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$ ]] || die "invalid admin name '$admin'"
[[ $target =~ ^([^:]+):([0-9]+)$ ]] || die "-B: expected HOST:PORT, got '$target'"
bhost=${BASH_REMATCH[1]} bport=${BASH_REMATCH[2]}
case "$role" in
  device | verifier | monitor | operator | bridge | relay) ;;
  admin) ! $file_mode && ! $revoke || die "-r admin: only for the dynamic-security broker" ;;
  *) die "unknown role '$role' (device, verifier, monitor, operator, bridge, relay, admin)" ;;
esac
command -v openssl >/dev/null || die "openssl not found"
if $file_mode; then
  command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (apt-get install mosquitto)"
else
  command -v mosquitto_ctrl >/dev/null || die "mosquitto_ctrl not found (apt-get install mosquitto)"
fi
if ! $revoke; then
  [[ -s $ca_dir/ca.crt && -s $ca_dir/ca.key ]] || die "no ca.crt/ca.key in $ca_dir (run make-test-ca.sh)"
fi

[[ $role == admin ]] && admin=$id  # bootstrap: ID is the admin
[[ $role == admin || $id != "$admin" ]] || die "'$id' is the dynamic-security admin, not a client"
p=$prefix
out=$dir/clients/$id
admin_dir=$dir/clients/$admin
mkdir -p "$dir"
umask 077
if [[ -z $password ]]; then
  password=$(openssl rand -base64 24 | tr -d '/+=\n')
fi
# It goes unquoted into an EnvironmentFile: no spaces, quotes, backslashes or $.
[[ $password =~ ^[A-Za-z0-9._~!@%^*()+=,:-]{8,}$ ]] \
  || die "password: at least 8 of A-Za-z0-9 and ._~!@%^*()+=,:- (no spaces, quotes, \\ or \$)"

# Home Assistant discovery node id of this client (middleware.protocol.topics.ha_node_id):
# "<prefix>_<kind>_<id>" with every character outside [A-Za-z0-9_-] made "_".
ha_node() { printf '%s_%s_%s' "$p" "$1" "$id" | sed 's/[^A-Za-z0-9_-]/_/g'; }

# --- the rights of each role ------------------------------------------------------------
# One line per right: "read FILTER" (may subscribe to FILTER or anything inside it and
# receive what matches) or "write TOPIC-FILTER" (may publish there).  The spec of the
# roles (username = identity; one namespace for all roles):
#   device    its own sessions (session/ID/+/leaf: writes open/draft/text/result, reads
#             verdict/state), its own status (write) and inbox (read), every verifier's
#             status (failover on a verifier's will), its own Home Assistant discovery.
#             Never a $share/... filter, never another device's topics, no verdict/state.
#   verifier  reads open/draft of every session, joins share groups for opens
#             ($share/<group>/PREFIX/session/+/+/open, any group: verifiers with
#             different target models use different groups), writes verdict/state, its
#             own status and discovery.
#   monitor   read-only (mw-cli tail/sessions/stats, Node-RED, Home Assistant, $SYS).
#   operator  reads everything, sends prompts to any inbox (mw-cli generate), reads and
#             clears discovery configs (mw-cli decommission).
#   bridge    an edge broker's uplink (bridge-edge.conf): the union of the device
#             rights of all devices behind it.
#   relay     the MQTT<->ZeroMQ bridge (mw-cli bridge): relays all of PREFIX/# both
#             ways (a narrower role would make it retry and then drop refused relays).
rights() {
  case "$role" in
    device) printf '%s\n' \
      "write $p/session/$id/+/open" "write $p/session/$id/+/draft" \
      "write $p/session/$id/+/text" "write $p/session/$id/+/result" \
      "read $p/session/$id/+/verdict" "read $p/session/$id/+/state" \
      "write $p/device/$id/status" "read $p/device/$id/inbox" \
      "read $p/verifier/+/status" \
      "write homeassistant/+/$(ha_node device)/+/config" ;;
    verifier) printf '%s\n' \
      "read $p/session/+/+/open" "read \$share/+/$p/session/+/+/open" \
      "read $p/session/+/+/draft" \
      "write $p/session/+/+/verdict" "write $p/session/+/+/state" \
      "write $p/verifier/$id/status" "read $p/verifier/+/status" \
      "write homeassistant/+/$(ha_node verifier)/+/config" ;;
    monitor) printf '%s\n' "read $p/#" "read \$SYS/#" "read homeassistant/#" ;;
    operator) printf '%s\n' \
      "read $p/#" "write $p/device/+/inbox" "read homeassistant/#" "write homeassistant/#" ;;
    bridge) printf '%s\n' \
      "write $p/session/+/+/open" "write $p/session/+/+/draft" \
      "write $p/session/+/+/text" "write $p/session/+/+/result" \
      "read $p/session/+/+/verdict" "read $p/session/+/+/state" \
      "write $p/device/+/status" "read $p/device/+/inbox" "read $p/verifier/+/status" ;;
    relay) printf '%s\n' "read $p/#" "write $p/#" ;;
  esac
}

# --- the client certificate and settings files ----------------------------------------------
issue_certificate() {
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
}

write_env() {
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
}

# --- bootstrap: the dynamic-security state file and its admin --------------------------------
if [[ $role == admin ]]; then
  [[ ! -e $state ]] || die "$state exists (bootstrap once; rotate the admin password with
  mosquitto_ctrl ... dynsec setClientPassword $id)"
  state_dir=$(dirname "$state")
  [[ -d $state_dir ]] || { mkdir -p "$state_dir" && made_state_dir=true; }
  # mosquitto_ctrl exits 0 also on errors: check the file it should have written.
  mosquitto_ctrl dynsec init "$state" "$id" "$password" >/dev/null
  [[ -s $state ]] || die "mosquitto_ctrl dynsec init did not write $state"
  # The plugin rewrites the file (FILE.new, then rename) after every change, as the
  # broker's user: the file and its directory must be the mosquitto user's.
  if [[ $EUID -eq 0 ]] && getent passwd mosquitto >/dev/null; then
    chown mosquitto: "$state"
    [[ -z ${made_state_dir:-} ]] || chown mosquitto: "$state_dir"
  fi
  issue_certificate
  echo "created $state with admin '$id': $out/ (keep it on the broker host)"
  echo "start the broker (mosquitto.prod.conf loads the file), then provision clients"
  [[ $id == admin ]] || echo "(name this admin with -a $id when provisioning)"
  exit 0
fi

# --- edge broker: password file and acl file --------------------------------------------------
# Blocks between "# >>> mw:ID ROLE" and "# <<< mw:ID" in DIR/acl belong to this script.
acl_block_removed() {
  local acl=$dir/acl tmp
  [[ -e $acl ]] || : > "$acl"
  tmp=$(mktemp "$dir/.acl.XXXXXX")
  awk -v id="$id" '
    $0 == "# >>> mw:" id || index($0, "# >>> mw:" id " ") == 1 { skip = 1; next }
    skip && $0 == "# <<< mw:" id { skip = 0; next }
    skip { next }
    $0 == "" && blank { next }  # a removed block leaves no double blank line
    { blank = ($0 == ""); print }
  ' "$acl" > "$tmp"
  printf '%s' "$tmp"
}
if $file_mode; then
  acl=$dir/acl
  [[ -e $dir/passwd ]] || : > "$dir/passwd"
  tmp=$(acl_block_removed)
  if $revoke; then
    mosquitto_passwd -D "$dir/passwd" "$id" >/dev/null
    mv "$tmp" "$acl"
    broker_readable "$dir/passwd" "$acl"
    echo "revoked '$id' in $dir/passwd and $acl; reload the broker: systemctl reload mosquitto"
    exit 0
  fi
  mosquitto_passwd -b "$dir/passwd" "$id" "$password"
  if [[ -s $tmp ]]; then
    [[ -z $(tail -c1 "$tmp") ]] || echo >> "$tmp"  # end the last line
    [[ -z $(tail -n1 "$tmp") ]] || echo >> "$tmp"  # one blank line between blocks
  fi
  # The acl file's `pattern` lines give every user the device rights under its own
  # name, so role users deny their own device subtree (deny beats pattern).
  {
    echo "# >>> mw:$id $role"
    echo "user $id"
    if [[ $role == device ]]; then
      echo "# device: rights from the pattern lines (own status, inbox, sessions)"
      echo "topic write homeassistant/+/$(ha_node device)/+/config"
    else
      echo "topic deny $p/device/$id/#"
      echo "topic deny $p/session/$id/#"
      rights | sed -e 's/^read \$share\/.*//' -e '/^$/d' -e 's/^/topic /'
    fi
    echo "# <<< mw:$id"
  } >> "$tmp"
  mv "$tmp" "$acl"
  broker_readable "$dir/passwd" "$acl"
  issue_certificate
  write_env
  echo "provisioned $role '$id' in $dir/passwd and $acl: $out/"
  echo "reload the broker to apply: systemctl reload mosquitto (SIGHUP re-reads passwd and acl)"
  exit 0
fi

# --- central broker: the dynamic-security plugin, live -------------------------------------
for f in ca.crt "$admin.crt" "$admin.key" password; do
  [[ -s $admin_dir/$f ]] || die "no $admin_dir/$f: bootstrap first (provision-device.sh -r admin $admin)"
done
admin_password=$(<"$admin_dir/password")
admin_opts=(--cafile "$admin_dir/ca.crt" --cert "$admin_dir/$admin.crt" --key "$admin_dir/$admin.key"
  -u "$admin" -P "$admin_password" -h "$bhost" -p "$bport")
# One mosquitto_ctrl call, over TLS as the admin.  (Its -o options file is no help:
# 2.0.11 ignores the TLS options there, connects in plain text to the TLS port and
# exits 0 without an answer after 10 s.)  It exits 0 also when the broker answers
# with an error or refuses the login, so its output decides: "-i TEXT" tolerates an
# error containing TEXT.  The answer stays in $answer.
ctl() {
  local ignore=
  if [[ $1 == -i ]]; then ignore=$2; shift 2; fi
  answer=$(mosquitto_ctrl "${admin_opts[@]}" dynsec "$@" 2>&1 </dev/null) \
    || die "mosquitto_ctrl $1 on $target failed: $answer"
  if [[ $answer == *rror* || $answer == *"without encryption"* ]]; then
    [[ -n $ignore && $answer == *"$ignore"* ]] || die "mosquitto_ctrl $1 on $target: $answer"
  fi
}
role_name=mw-$id
if $revoke; then
  ctl -i "not found" deleteClient "$id"  # the plugin disconnects it at once
  ctl -i "not found" deleteRole "$role_name"
  echo "revoked '$id' on $target (client and role $role_name deleted)"
  exit 0
fi
# What no role grants is refused: subscribe, publish and also delivery (a subscription
# granted earlier, e.g. kept in a persistent session, delivers nothing it may not read;
# `dynsec init` leaves delivery allowed).  mosquitto_ctrl 2.0.11's setDefaultACLAccess
# changes nothing and reports no error (getDefaultACLAccess shows it), so the command
# goes to the plugin's control topic as JSON with mosquitto_rr.
defaults_denied() {
  local acltype
  for acltype in publishClientSend publishClientReceive subscribe; do
    grep -Eq "^$acltype +: deny" <<< "$answer" || return 1
  done
}
ctl getDefaultACLAccess
if ! defaults_denied; then
  command -v mosquitto_rr >/dev/null || die "mosquitto_rr not found (apt-get install mosquitto-clients)"
  deny='{"acltype":"%s","allow":false}'
  acls=$(printf "$deny,$deny,$deny" publishClientSend publishClientReceive subscribe)
  reply=$(mosquitto_rr "${admin_opts[@]}" -V 5 -W 10 -t "\$CONTROL/dynamic-security/v1" \
    -e "\$CONTROL/dynamic-security/v1/response" \
    -m "{\"commands\":[{\"command\":\"setDefaultACLAccess\",\"acls\":[$acls]}]}" \
    2>&1 </dev/null) || die "setDefaultACLAccess on $target failed: $reply"
  ctl getDefaultACLAccess
  defaults_denied || die "default access on $target is not deny: $answer ($reply)"
fi
# The role is rebuilt from nothing: a role change leaves no rights behind.
ctl -i "not found" deleteRole "$role_name"
ctl createRole "$role_name"
while read -r access filter; do
  case "$access" in
    read)
      ctl addRoleACL "$role_name" subscribePattern "$filter" allow
      # The plugin checks a delivery against the topic, never the $share/<group>/ form.
      [[ $filter == \$share/* ]] || ctl addRoleACL "$role_name" publishClientReceive "$filter" allow
      ;;
    write) ctl addRoleACL "$role_name" publishClientSend "$filter" allow ;;
  esac
done < <(rights)
ctl -i "already exists" createClient "$id" -p "$password"
[[ $answer != *"already exists"* ]] || ctl setClientPassword "$id" "$password"
ctl addClientRole "$id" "$role_name"
# Silence is success for mosquitto_ctrl: read back what the broker now holds.
ctl getRole "$role_name"
want=0
while read -r access filter; do
  want=$((want + 1))
  [[ $access == read && $filter != \$share/* ]] && want=$((want + 1))
done < <(rights)
got=$(grep -c ": allow :" <<< "$answer" || true)
[[ $got -eq $want ]] || die "role $role_name on $target holds $got ACLs, expected $want: $answer"
ctl getClient "$id"
[[ $answer == *"$role_name"* ]] || die "client $id on $target lacks role $role_name: $answer"
issue_certificate
write_env
echo "provisioned $role '$id' on $target (client $id, role $role_name): $out/"
echo "live: no reload needed (the plugin saves its state file itself)"
