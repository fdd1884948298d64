#!/usr/bin/env bash
# Make a small CA and one certificate per host, for TLS and mutual TLS between the gateway and
# the encoder / decoder services.
#
#   deploy/tls/make-certs.sh OUT_DIR NAME [NAME ...]
#
# NAME is a host name or an IP address; it becomes the certificate's subject alternative name.
# Each certificate works as a server and as a client certificate (the gateway presents one to
# the services under mTLS). Writes OUT_DIR/ca.pem, OUT_DIR/ca-key.pem and, per NAME,
# OUT_DIR/NAME.pem + OUT_DIR/NAME-key.pem. Keep ca-key.pem offline.
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR NAME [NAME ...]}
shift
[ "$#" -ge 1 ] || { echo "give at least one host name or IP" >&2; exit 2; }
mkdir -p "$out"
if [ ! -f "$out/ca.pem" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=mmserve-ca" \
    -keyout "$out/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
fi
for name in "$@"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san="IP:$name"; else san="DNS:$name"; fi
  cat > "$out/$name.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EXT
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$out/$name-key.pem" -out "$out/$name.csr" 2>/dev/null
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca-key.pem" -CAcreateserial \
    -days 825 -extfile "$out/$name.ext" -out "$out/$name.pem" 2>/dev/null
  rm -f "$out/$name.csr" "$out/$name.ext"
  echo "wrote $out/$name.pem and $out/$name-key.pem"
done
