#!/usr/bin/env bash
# A development CA and one server certificate it signs, for compose.tls.yaml (docs/security.md).
#
#   deploy/tls/gen-dev-cert.sh [--force] [OUT_DIR]     (default OUT_DIR: deploy/tls/certs)
#
# Writes ca.pem + ca.key (the CA: trust ca.pem in clients, e.g. curl --cacert, AISTACK_CA_BUNDLE)
# and server.pem + server.key (valid for localhost, 127.0.0.1 and the compose service names).
# Extra names: DEV_CERT_SANS="DNS:aistack.example.test,IP:10.0.0.5". Existing files are kept
# unless --force is given. DEVELOPMENT ONLY: the key is left readable by the containers' user
# (uid 10001) through a bind mount; production certificates come from your CA or cert-manager.
set -euo pipefail

force=0
if [[ "${1:-}" == "--force" ]]; then force=1; shift; fi
out=${1:-"$(cd "$(dirname "$0")" && pwd)/certs"}
days=${DEV_CERT_DAYS:-825}
sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:gateway,DNS:auth,DNS:orchestrator,DNS:model,DNS:features,DNS:pipeline"
if [[ -n "${DEV_CERT_SANS:-}" ]]; then sans="$sans,$DEV_CERT_SANS"; fi

command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
mkdir -p "$out"
if [[ -f "$out/server.pem" && -f "$out/server.key" && $force -eq 0 ]]; then
  echo "kept existing $out/server.pem (use --force to make new ones)"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days "$days" \
  -subj "/O=aistack development/CN=aistack development CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null

openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 \
  -subj "/O=aistack development/CN=localhost" -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null

cat >"$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$tmp/server.ext" -out "$tmp/server.pem" 2>/dev/null

openssl verify -CAfile "$tmp/ca.pem" "$tmp/server.pem" >/dev/null
chmod 600 "$tmp/ca.key"
chmod 644 "$tmp/ca.pem" "$tmp/server.pem" "$tmp/server.key"  # development only, see above
mv -f "$tmp/ca.pem" "$tmp/ca.key" "$tmp/server.pem" "$tmp/server.key" "$out/"
echo "wrote $out/{ca.pem,ca.key,server.pem,server.key} for: $sans"
