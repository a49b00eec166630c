#!/usr/bin/env bash
# Create a private CA and a broker (server) certificate for Mosquitto's TLS listener.
#
#   deploy/mosquitto/make-test-ca.sh [-d DIR] [-n BROKER_NAME] [-s SAN]...
#
#   -d DIR    output directory (default: ./mw-ca); created if missing
#   -n NAME   the server certificate's CN (default: localhost)
#   -s SAN    an extra subjectAltName entry, e.g. -s DNS:broker.lan -s IP:10.0.0.5
#             (repeatable; DNS:localhost and IP:127.0.0.1 are always included)
#
# Writes DIR/ca.key, DIR/ca.crt (the CA: give ca.crt to every client, keep
# ca.key offline), DIR/server.key and DIR/server.crt (for the broker).  An
# existing CA in DIR is reused, so re-running only re-issues the server
# certificate (e.g. with new SANs); client certificates stay valid.
#
# "test" CA: fine for a lab or a private fleet; in production you may prefer
# your organisation's PKI.  Keys are ECDSA P-256 (fast on a Pi, supported by
# every TLS stack used here).  Needs: openssl >= 1.1.1.
set -euo pipefail

dir=./mw-ca
cn=localhost
sans=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while getopts "d:n:s:h" opt; do
  case "$opt" in
    d) dir=$OPTARG ;;
    n) cn=$OPTARG ;;
    s) sans+=("$OPTARG") ;;
    h) usage 0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || usage

command -v openssl >/dev/null || { echo "make-test-ca.sh: openssl not found" >&2; exit 1; }
mkdir -p "$dir"
umask 077  # keys readable by the owner only
cd "$dir"

if [[ ! -s ca.key || ! -s ca.crt ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=mw test CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out ca.crt
  echo "created CA: $PWD/ca.crt"
fi

san="DNS:localhost,IP:127.0.0.1"
[[ $cn != localhost ]] && san="DNS:$cn,$san"
for s in "${sans[@]+"${sans[@]}"}"; do san="$san,$s"; done

openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=$cn" -out server.csr
cat > server.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
# -set_serial with random bits: no ca.srl file to keep in sync between runs.
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -sha256 -days 825 \
  -set_serial "0x$(openssl rand -hex 16)" -extfile server.ext -out server.crt 2>/dev/null
rm -f server.csr server.ext
chmod 0644 ca.crt server.crt
# Mosquitto 2 reads the key after dropping root to the mosquitto user.
if [[ $EUID -eq 0 ]] && getent group mosquitto >/dev/null; then
  chgrp mosquitto server.key && chmod 0640 server.key
fi
echo "created server certificate: $PWD/server.crt ($san)"
