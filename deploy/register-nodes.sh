#!/bin/sh
# Register every SuperNode public key found in $KEYS_DIR (*.pub) at the SuperLink with `flwr supernode register`.
# Safe to run again: a key the SuperLink already knows is reported and skipped; any other failure stops the script
# with exit code 1. Used by docker-compose.yml (service register-nodes) and by tests/test_deployment.py.
#
# Environment: SUPERLINK_ADDRESS (host:port, default superlink:9093), CA_CERT (the federation's ca.crt, default
# /certs/ca.crt), KEYS_DIR (default /node-keys), FLWR_HOME (where the connection `mammofl` is written; default
# ~/.flwr). Flower's update check and telemetry are switched off.
set -eu

SUPERLINK_ADDRESS="${SUPERLINK_ADDRESS:-superlink:9093}"
CA_CERT="${CA_CERT:-/certs/ca.crt}"
KEYS_DIR="${KEYS_DIR:-/node-keys}"
FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}"
export FLWR_HOME FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0 COLUMNS=200

mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "mammofl"

[superlink.mammofl]
address = "$SUPERLINK_ADDRESS"
root-certificates = "$CA_CERT"
TOML

found=0
for key in "$KEYS_DIR"/*.pub; do
    [ -f "$key" ] || continue
    found=$((found + 1))
    if output=$(flwr supernode register "$key" mammofl 2>&1); then
        echo "registered: $(basename "$key")"
    else
        case "$output" in
            *"already in use"*) echo "already registered: $(basename "$key")" ;;
            *) echo "failed to register $(basename "$key"):" >&2; echo "$output" >&2; exit 1 ;;
        esac
    fi
done
if [ "$found" -eq 0 ]; then
    echo "no public keys (*.pub) in $KEYS_DIR" >&2
    exit 1
fi
