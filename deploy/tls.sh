#!/usr/bin/env bash
# The certificate nginx serves PUBLIC_URL with, for deploy/services.sh's nginx_render.
# usage: deploy/tls.sh HOST     prints two lines: the certificate's path, then its key's path
#
# With TLS_CERT and TLS_KEY set (.env), those files are used as given: checked to exist, and a warning goes
# to stderr when the certificate has expired or does not name HOST. Without them, a local certificate
# authority and a server certificate live in DATA_DIR/tls and are made with openssl when missing; the
# server certificate is made anew when it expires within 30 days, was not signed by that CA, or does not
# name HOST, 127.0.0.1 and localhost. The CA's key never leaves DATA_DIR/tls. Messages go to stderr:
# stdout is read by the caller.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
load_settings

host=${1:?usage: deploy/tls.sh HOST}
TLS_DIR=$DATA_DIR/tls
RENEW_BEFORE=$((30 * 86400))   # seconds before expiry at which a certificate is made anew
CA_DAYS=3650
SERVER_DAYS=365

note() { printf 'tls: %s\n' "$*" >&2; }
is_ip() { [[ $1 =~ ^[0-9.]+$ || $1 == *:* ]]; }

# True when CERT names HOST (an IP address or a DNS name) in its subjectAltName.
names_host() {
    local cert=$1 name=$2 flag=-checkhost
    is_ip "$name" && flag=-checkip
    openssl x509 -in "$cert" -noout "$flag" "$name" 2>/dev/null | grep -q "does match"
}

# True when CERT is still valid RENEW_BEFORE seconds from now.
lasts() { openssl x509 -in "$1" -noout -checkend "$RENEW_BEFORE" >/dev/null 2>&1; }

if [ -n "${TLS_CERT:-}${TLS_KEY:-}" ]; then
    if [ -z "${TLS_CERT:-}" ] || [ -z "${TLS_KEY:-}" ]; then die "set both TLS_CERT and TLS_KEY in .env, or neither"; fi
    cert=$(abspath "$TLS_CERT"); key=$(abspath "$TLS_KEY")
    [ -r "$cert" ] || die "TLS_CERT=$TLS_CERT: no readable file at $cert"
    [ -r "$key" ] || die "TLS_KEY=$TLS_KEY: no readable file at $key"
    openssl x509 -in "$cert" -noout 2>/dev/null || die "TLS_CERT=$TLS_CERT is not a PEM certificate"
    openssl x509 -in "$cert" -noout -checkend 0 >/dev/null 2>&1 \
        || note "warning: TLS_CERT $cert has expired; browsers will refuse it"
    names_host "$cert" "$host" || note "warning: TLS_CERT $cert does not name $host (PUBLIC_URL's host)"
    printf '%s\n%s\n' "$cert" "$key"
    exit 0
fi

install -d -m 700 "$TLS_DIR"
umask 077
ca_crt=$TLS_DIR/ca.crt ca_key=$TLS_DIR/ca.key crt=$TLS_DIR/server.crt key=$TLS_DIR/server.key

if ! { [ -s "$ca_key" ] && [ -s "$ca_crt" ] && lasts "$ca_crt"; }; then
    note "making a local certificate authority in $TLS_DIR"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$CA_DAYS" \
        -subj "/O=vmgate/CN=vmgate local CA $(hostname -s 2>/dev/null || echo)" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$ca_key.tmp" -out "$ca_crt.tmp" 2>/dev/null || die "openssl could not make the CA in $TLS_DIR"
    chmod 600 "$ca_key.tmp"; chmod 644 "$ca_crt.tmp"
    mv "$ca_key.tmp" "$ca_key"; mv "$ca_crt.tmp" "$ca_crt"
    rm -f "$crt"  # signed by the CA that was replaced
fi

reason=""
if ! [ -s "$key" ] || ! [ -s "$crt" ]; then reason="none yet"
elif ! openssl verify -CAfile "$ca_crt" "$crt" >/dev/null 2>&1; then reason="not signed by $ca_crt"
elif ! lasts "$crt"; then reason="expires within $((RENEW_BEFORE / 86400)) days"
else
    for name in 127.0.0.1 localhost "$host"; do
        names_host "$crt" "$name" || { reason="does not name $name"; break; }
    done
fi

if [ -n "$reason" ]; then
    sans="IP:127.0.0.1,DNS:localhost"
    case $host in 127.0.0.1|localhost) ;; *) if is_ip "$host"; then sans="$sans,IP:$host"; else sans="$sans,DNS:$host"; fi ;; esac
    note "making a server certificate for $host ($reason): $crt"
    ext=$TLS_DIR/server.ext
    printf '%s\n' "subjectAltName=$sans" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=vmgate/CN=$host" \
        -keyout "$key.tmp" -out "$TLS_DIR/server.csr" 2>/dev/null || die "openssl could not make a key in $TLS_DIR"
    openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$ca_crt" -CAkey "$ca_key" -CAcreateserial \
        -sha256 -days "$SERVER_DAYS" -extfile "$ext" -out "$crt.tmp" 2>/dev/null \
        || die "openssl could not sign the server certificate in $TLS_DIR"
    rm -f "$TLS_DIR/server.csr" "$ext"
    chmod 600 "$key.tmp"; chmod 644 "$crt.tmp"
    mv "$key.tmp" "$key"; mv "$crt.tmp" "$crt"
    note "browsers trust it once they trust the local CA $ca_crt (docs/DEPLOYMENT.md, \"HTTPS\")"
fi
printf '%s\n%s\n' "$crt" "$key"
