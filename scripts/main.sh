#!/usr/bin/env bash
# Set up .venv and run the main job: `qlora demo` by default (QLoRA vs 16-bit LoRA fine-tuning of the pretrained
# all-MiniLM-L6-v2), or the qlora subcommand given: `bash scripts/main.sh verify`, `... quantize IN OUT`, ...
# Arguments that start with an option go to the demo: `bash scripts/main.sh --steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
    set -- demo
elif [[ "$1" == -* && "$1" != "-h" && "$1" != "--help" ]]; then
    set -- demo "$@"
fi
exec .venv/bin/qlora "$@"
