#!/usr/bin/env bash
# Build (once) the reference Go router "Auto AI Router"
# (module github.com/mixaill76/auto_ai_router, package cmd/server) from the
# Go module proxy and print the absolute path of the binary as the only line
# on stdout. Progress and errors go to stderr.
#
# Environment:
#   GO_ROUTER_BIN      path of an already built binary. When it is set and
#                      executable, it is printed and the script exits 0 without
#                      touching the network (for machines where the module proxy
#                      does not serve the module and the binary was built some
#                      other way). Set but not executable: exit 1.
#   GO_ROUTER_VERSION  module version to build (default: $DEFAULT_VERSION below).
#                      "latest" is resolved through the proxy to a concrete
#                      version, which then names the cache directory.
#   GO_ROUTER_MODULE   module path  (default: github.com/mixaill76/auto_ai_router)
#   GO_ROUTER_PKG      main package  (default: $GO_ROUTER_MODULE/cmd/server)
#   GO_ROUTER_TOOLCHAIN  GOTOOLCHAIN used for the build (default: auto, so a
#                      module whose go.mod asks for a newer Go than the local
#                      one gets golang.org/toolchain from the module proxy)
#   GO_ROUTER_FORCE_WRAPPER=1  skip `go install` and use the wrapper-module build
#   XDG_CACHE_HOME     cache root (default: $HOME/.cache)
#
# Exit codes: 0 ok; 3 the module proxy does not serve the module/version
# (tests should treat this as "reference router unavailable" and skip);
# anything else: build failure.
set -euo pipefail

# Pin. NOTE: at the time of writing the Go module proxy reachable from this
# workplace answers 403 "This module version is not available" for this
# module (even for the version list), so no concrete version could be
# pinned; replace "latest" with a concrete vX.Y.Z once one is served.
DEFAULT_VERSION="latest"

MODULE="${GO_ROUTER_MODULE:-github.com/mixaill76/auto_ai_router}"
PKG="${GO_ROUTER_PKG:-$MODULE/cmd/server}"
VERSION="${GO_ROUTER_VERSION:-$DEFAULT_VERSION}"
BIN_NAME="${PKG##*/}"

log() { printf 'go-router.sh: %s\n' "$*" >&2; }

if [[ -n "${GO_ROUTER_BIN:-}" ]]; then
    if [[ -x "$GO_ROUTER_BIN" && ! -d "$GO_ROUTER_BIN" ]]; then
        log "using prebuilt GO_ROUTER_BIN=$GO_ROUTER_BIN"
        printf '%s\n' "$(cd "$(dirname "$GO_ROUTER_BIN")" && pwd)/$(basename "$GO_ROUTER_BIN")"
        exit 0
    fi
    log "error: GO_ROUTER_BIN=$GO_ROUTER_BIN is not an executable file"
    exit 1
fi

if ! command -v go >/dev/null 2>&1; then
    if [[ -x /usr/local/go/bin/go ]]; then
        export PATH="$PATH:/usr/local/go/bin"
    else
        log "error: no 'go' on PATH and /usr/local/go/bin/go does not exist"
        exit 1
    fi
fi

# Build outside any module/workspace; strip -mod=... (not allowed with pkg@version).
export GOWORK=off
export GO111MODULE=on
export GOTOOLCHAIN="${GO_ROUTER_TOOLCHAIN:-auto}"
GOFLAGS="$(printf '%s' "${GOFLAGS:-}" | sed -E 's/(^|[[:space:]])-mod=[^[:space:]]*//g')"
export GOFLAGS

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/airouter/go-router"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/go-router.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# Returns 3 (after logging) if the output says the proxy refuses the module.
check_unavailable() {
    local errfile="$1"
    if grep -qiE '403 Forbidden|410 Gone|404 Not Found|not available|unknown revision|invalid version' "$errfile"; then
        log "error: the Go module proxy does not serve $MODULE@$VERSION:"
        sed 's/^/    /' "$errfile" >&2
        return 3
    fi
    return 0
}

# Resolve a query ("latest", a branch, ...) to a concrete version for the cache key.
if [[ ! "$VERSION" =~ ^v[0-9]+\.[0-9]+\.[0-9]+ ]]; then
    cached="$(ls -1d "$CACHE_ROOT"/v*/ 2>/dev/null | sort -V | tail -n1 || true)"
    log "resolving $MODULE@$VERSION via $(go env GOPROXY)"
    if ! resolved="$(go list -m -f '{{.Version}}' "$MODULE@$VERSION" 2>"$WORK/list.err")"; then
        if [[ -n "$cached" && -x "$cached/$BIN_NAME" && "$VERSION" == latest ]]; then
            log "warning: cannot resolve $VERSION; using cached $(basename "$cached")"
            printf '%s\n' "$(cd "$cached" && pwd)/$BIN_NAME"
            exit 0
        fi
        check_unavailable "$WORK/list.err" || exit 3
        cat "$WORK/list.err" >&2
        exit 1
    fi
    log "resolved $VERSION -> $resolved"
    VERSION="$resolved"
fi

DEST="$CACHE_ROOT/$VERSION"
BIN="$DEST/$BIN_NAME"
if [[ -x "$BIN" ]]; then
    log "using cached $BIN"
    printf '%s\n' "$BIN"
    exit 0
fi
mkdir -p "$DEST"

# Serialise concurrent builds of the same version.
exec 9>"$DEST/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if [[ -x "$BIN" ]]; then
    log "using cached $BIN (built concurrently)"
    printf '%s\n' "$BIN"
    exit 0
fi

STAGE="$WORK/bin"
mkdir -p "$STAGE"
start=$(date +%s)

build_with_wrapper() {
    # A throw-away module that requires the target module; building its main
    # package from here ignores the target's replace/exclude directives.
    log "building $PKG@$VERSION through a wrapper module"
    mkdir -p "$WORK/wrapper"
    (
        cd "$WORK/wrapper"
        go mod init airouter.local/go-router-wrapper >/dev/null 2>&1
        # Adds the module and every dependency of the main package.
        go get "$PKG@$VERSION" >&2 2>"$WORK/get.err" || {
            cat "$WORK/get.err" >&2
            check_unavailable "$WORK/get.err" || exit 3
            exit 1
        }
        go build -trimpath -o "$STAGE/$BIN_NAME" "$PKG" >&2
    )
}

rc=0
if [[ "${GO_ROUTER_FORCE_WRAPPER:-0}" == 1 ]]; then
    build_with_wrapper || rc=$?
else
    log "go install $PKG@$VERSION (GOBIN=$DEST); a cold build takes several minutes"
    if GOBIN="$STAGE" go install -trimpath "$PKG@$VERSION" 2>"$WORK/install.err"; then
        rc=0
    else
        cat "$WORK/install.err" >&2
        if grep -qE 'contains one or more (replace|exclude) directives|must not contain directives' "$WORK/install.err"; then
            log "go install refused the module's go.mod; falling back to a wrapper module"
            build_with_wrapper || rc=$?
        else
            check_unavailable "$WORK/install.err" || rc=3
            [[ $rc -ne 0 ]] || rc=1
        fi
    fi
fi
if [[ $rc -ne 0 ]]; then
    rm -f "$DEST/.lock"
    rmdir "$DEST" 2>/dev/null || true
    log "build failed (exit $rc)"
    exit "$rc"
fi

mv -f "$STAGE/$BIN_NAME" "$BIN.tmp.$$"
mv -f "$BIN.tmp.$$" "$BIN"
log "built $BIN in $(( $(date +%s) - start ))s"
printf '%s\n' "$BIN"
