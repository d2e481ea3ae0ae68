#!/usr/bin/env bash
# Start `edge-dlm chat` in a real terminal under tmux, type a prompt, and check the answer shows up.
# Usage: scripts/tmux_chat_check.sh [MODEL_DIR]   (default: the bundled demo model)
# Exit 0 when the answer and the status line appear; prints the final screen either way.
set -euo pipefail
cd "$(dirname "$0")/.."
session="edge-dlm-check-$$"
data=$(mktemp -d)
model_arg=()
[ $# -ge 1 ] && model_arg=(--model "$1")
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
# XDG_DATA_HOME keeps the check's chat database out of the user's own
tmux new-session -d -s "$session" -x 100 -y 30 \
  "XDG_DATA_HOME=$data TERM=xterm-256color .venv/bin/edge-dlm chat ${model_arg[*]} --mode ar --max-new-tokens 24"
screen() { tmux capture-pane -p -t "$session"; }
wait_for() {  # wait_for PATTERN SECONDS
  for _ in $(seq 1 $(( $2 * 5 ))); do
    screen | grep -q "$1" && return 0
    sleep 0.2
  done
  return 1
}
if ! wait_for "Message (Enter to send)" 60; then echo "the app did not become ready"; screen; exit 1; fi
tmux send-keys -t "$session" "Write a Python function is_even(n)." Enter
if ! wait_for "tok/s │ TPF [0-9]" 120; then echo "no answer within 120 s"; screen; exit 1; fi
screen
screen | grep -q "is_even" || { echo "the prompt is not on screen"; exit 1; }
echo "tmux chat check: ok (answer streamed, status line shows $(screen | grep -o '[0-9.]* tok/s' | head -1))"
