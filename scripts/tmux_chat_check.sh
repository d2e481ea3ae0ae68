#!/usr/bin/env bash
# `edge-dlm chat` in a real terminal under tmux, as a user sees it, at 80x24 and 120x40:
#  - the reply is on screen while it streams and at its end, without any key pressed;
#  - the status line and the footer fit the width (F4 shows, the status line is not cut);
#  - the chat's tok/s against `edge-dlm generate` on the same model, mode and engine, measured
#    alternately in this run (the median over ROUNDS of each round's chat / generate ratio): at least
#    MIN_RATIO (default 0.9, the target; the test suite asks 0.6, which only a chat that waits on its
#    screen misses: this VM's runs of the same command differ by +-20%, so 0.9 is a benchmark, not a test).
# Usage: [MIN_RATIO=0.9] scripts/tmux_chat_check.sh [MODEL_DIR] [ROUNDS]   (default: the demo model, 3)
# Exit 0 when every check holds; prints the screens and the numbers either way. The last line says
# "ok", or "speed skipped" when the machine was busier than its cores (the ratio then is not asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
model_arg=()
[ $# -ge 1 ] && [ -n "$1" ] && model_arg=(--model "$1")
rounds=${2:-3}
min_ratio=${MIN_RATIO:-0.9}
tokens=1500
prompt="Write a Python function is_even(n)."
data=$(mktemp -d)
session="edge-dlm-check-$$"
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
export XDG_DATA_HOME="$data/data" XDG_CACHE_HOME="$data/cache"  # the user's chats and caches stay untouched
fail() { { echo "FAIL: $*"; tmux capture-pane -p -t "$session" 2>/dev/null || true; } >&2; exit 1; }
screen() { tmux capture-pane -p -t "$session"; }
poll=0.05
wait_for() {  # wait_for PATTERN SECONDS (looks every $poll s)
  local end=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -le "$end" ]; do
    screen | grep -q -- "$1" && return 0
    sleep "$poll"
  done
  return 1
}

# the reference: generate, same model, mode and engine (torch: no calibration, no auto-built engine)
expected=$(.venv/bin/edge-dlm generate "${model_arg[@]}" --mode ar --engine torch --max-new-tokens $tokens \
  --prompt "$prompt" --json)
last_word=$(python3 -c 'import json,re,sys; w=re.findall(r"[A-Za-z_]{4,}", json.loads(sys.argv[1])["text"]); print(w[-1] if w else "")' "$expected")

chat_rate() {  # chat_rate COLS ROWS -> the tok/s the status line shows after one answer
  tmux kill-session -t "$session" 2>/dev/null || true
  tmux new-session -d -s "$session" -x "$1" -y "$2" \
    "TERM=xterm-256color .venv/bin/edge-dlm chat ${model_arg[*]} --mode ar --engine torch --max-new-tokens $tokens"
  wait_for "Message (Enter to send)" 60 || fail "the app did not become ready at $1x$2"
  tmux send-keys -t "$session" "$prompt" Enter
  if [ "${3:-}" = "look" ]; then
    wait_for "generating" 30 || fail "no streaming status at $1x$2"
    sleep 0.5
    mid=$(screen)
    echo "$mid" | grep -q "generating" || fail "the answer ended before it could be seen streaming at $1x$2"
    # while it streams, the reply is on screen: lines of the expected answer show before it ends (a
    # line of 3 characters counts: the demo model's replies can be runs of `"""` when the check looks)
    seen=$(python3 -c 'import json,sys; t=" ".join(json.loads(sys.argv[1])["text"].split())
rows = [r.split("\u2502")[0].lstrip("\u2588 ").strip() for r in sys.argv[2].splitlines() if r.startswith("\u2588")]
print(sum(1 for r in rows if len(r) >= 3 and " ".join(r.split()) in t))' "$expected" "$mid")
    [ "$seen" -ge 3 ] || fail "the streaming reply is not visible at $1x$2 ($seen lines of it on screen)"
  fi
  wait_for "tok/s │ TPF [0-9]" 120 || fail "no answer within 120 s at $1x$2"
  sleep 0.3
  if [ "${3:-}" = "look" ]; then
    end=$(screen)
    printf -- '---- %sx%s, at the end of the answer ----\n%s\n' "$1" "$2" "$end" >&2
    [ -z "$last_word" ] || echo "$end" | grep -q -- "$last_word" || fail "the end of the reply ('$last_word') is not visible at $1x$2"
    echo "$end" | grep -q "f4 Quality" || fail "the footer is cut at $1x$2"
    status=$(echo "$end" | grep "tok/s │ TPF")
    echo "$status" | grep -q "MB" || fail "the status line is cut at $1x$2: $status"
  fi
  screen | grep -o '[0-9.]* tok/s' | head -1 | cut -d' ' -f1
  tmux kill-session -t "$session" 2>/dev/null || true
}

chat_rate 80 24 look >/dev/null
chat_rate 120 40 look >/dev/null
poll=1  # while timing, look rarely: the check must not take the CPU the chat decodes on
compare() {  # alternately, so both see the same machine; exit 0 when the ratio is at least $min_ratio
  local chats=() gens=()
  for _ in $(seq 1 "$rounds"); do
    gens+=("$(.venv/bin/edge-dlm generate "${model_arg[@]}" --mode ar --engine torch --max-new-tokens $tokens \
      --prompt "$prompt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])')")
    chats+=("$(chat_rate 100 30 | tail -1)")
  done
  python3 - "${chats[*]}" "${gens[*]}" "$min_ratio" <<'EOF'
import statistics, sys
chat = [float(x) for x in sys.argv[1].split()]
gen = [float(x) for x in sys.argv[2].split()]
# each round times generate and then the chat back to back, so the ratio within a round cancels the
# machine's drift between rounds; the median of the rounds' ratios ignores a round where either run was
# an outlier (the best of each did not: one lucky generate run set the bar for every chat run)
ratios = [c / g for c, g in zip(chat, gen)]
r = statistics.median(ratios)
print(f"chat tok/s {chat} (best {max(chat):.1f}); generate tok/s {[round(x, 1) for x in gen]} (best {max(gen):.1f}); "
      f"chat/generate per round {[round(x, 3) for x in ratios]}, median {r:.3f}")
sys.exit(0 if r >= float(sys.argv[3]) else 1)
EOF
}
# The ratio is a wall-clock comparison: measured twice at most (a second look when the first fell within
# the machine's noise), and only reported, not asserted, on a machine already busier than its cores.
busy=$(python3 -c 'import os; print(int(os.getloadavg()[0] > len(os.sched_getaffinity(0))))')
if ! compare && ! compare; then
  if [ "$busy" = 1 ]; then echo "tmux chat check: speed skipped (load above the cores: the ratio is reported, not asserted)"; exit 0
  else echo "FAIL: the chat decodes at less than $min_ratio of generate's speed"; exit 1; fi
fi
echo "tmux chat check: ok (chat/generate at least $min_ratio)"
