#!/usr/bin/env bash
# Starts or stops a real Kubernetes control plane (etcd + kube-apiserver, RBAC on) on loopback,
# as shared/k8s-test-harness.md describes. No kubelet or controller-manager: CRUD, CRDs, CEL,
# server-side apply, watches, RBAC and TokenRequest all work.
#
#   tests/tools/control-plane.sh start DIR   # prints nothing; writes DIR/admin.kubeconfig
#   tests/tools/control-plane.sh stop DIR
set -euo pipefail
cmd="${1:?start|stop}"; D="$(mkdir -p "${2:?DIR}" && cd "$2" && pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

case "$cmd" in
stop)
    for p in apiserver etcd; do
        if [ -f "$D/$p.pid" ]; then kill "$(cat "$D/$p.pid")" 2>/dev/null || true; fi
    done
    for p in apiserver etcd; do
        if [ -f "$D/$p.pid" ]; then
            for _ in $(seq 1 50); do kill -0 "$(cat "$D/$p.pid")" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$(cat "$D/$p.pid")" 2>/dev/null || true
            rm -f "$D/$p.pid"
        fi
    done
    ;;
start)
    BIN="$("$HERE/k8s-binaries.sh")"
    P="$D/pki"; mkdir -p "$P"
    (
        cd "$P"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=harness-ca \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > srv.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile srv.ext -out apiserver.crt
        openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=harness-admin"
        printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > cli.ext
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile cli.ext -out admin.crt
        openssl genrsa -out sa.key 2048
    ) >/dev/null 2>&1
    EP=$(free_port); PP=$(free_port); AP=$(free_port)
    "$BIN/etcd" --name=h --data-dir="$D/etcd" \
        --listen-client-urls="http://127.0.0.1:$EP" --advertise-client-urls="http://127.0.0.1:$EP" \
        --listen-peer-urls="http://127.0.0.1:$PP" --initial-advertise-peer-urls="http://127.0.0.1:$PP" \
        --initial-cluster="h=http://127.0.0.1:$PP" --unsafe-no-fsync --log-level=warn >"$D/etcd.log" 2>&1 &
    echo $! > "$D/etcd.pid"
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$EP/health" >/dev/null && break; sleep 0.1; done
    "$BIN/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$EP" \
        --bind-address=127.0.0.1 --secure-port="$AP" --cert-dir="$P" \
        --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
        --client-ca-file="$P/ca.crt" --authorization-mode=RBAC \
        --service-account-issuer="https://127.0.0.1:$AP" \
        --service-account-key-file="$P/sa.key" --service-account-signing-key-file="$P/sa.key" \
        --service-cluster-ip-range=10.0.0.0/24 --disable-admission-plugins=ServiceAccount \
        --allow-privileged=true --endpoint-reconciler-type=none --v=1 >"$D/apiserver.log" 2>&1 &
    echo $! > "$D/apiserver.pid"
    ok=""
    for _ in $(seq 1 240); do
        if curl -sfk "https://127.0.0.1:$AP/readyz" >/dev/null; then ok=1; break; fi
        sleep 0.25
    done
    [ -n "$ok" ] || { echo "kube-apiserver did not become ready; see $D/apiserver.log" >&2; exit 1; }
    K="$BIN/kubectl config --kubeconfig=$D/admin.kubeconfig"
    $K set-cluster h --server="https://127.0.0.1:$AP" --certificate-authority="$P/ca.crt" --embed-certs >/dev/null
    $K set-credentials admin --client-certificate="$P/admin.crt" --client-key="$P/admin.key" --embed-certs >/dev/null
    $K set-context h --cluster=h --user=admin >/dev/null
    $K use-context h >/dev/null
    echo "$BIN" > "$D/bin"
    ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
