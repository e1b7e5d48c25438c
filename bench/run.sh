#!/usr/bin/env bash
# Run every benchmark and append its JSON line to bench/results-<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="bench/results-$(date +%Y%m%d).json"
.venv/bin/meterops bench ingest --format json | tee -a "$out"
.venv/bin/meterops bench train --format json | tee -a "$out"
.venv/bin/meterops bench pipeline --format json | tee -a "$out"
