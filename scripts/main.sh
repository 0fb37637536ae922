#!/usr/bin/env bash
# Set up .venv and run the main job: `qlora verify` by default, or the qlora subcommand given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- verify; fi
exec .venv/bin/qlora "$@"
