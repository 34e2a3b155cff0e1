#!/bin/bash
# Re-make docs/img/checkpoint-progress.png (and .txt): a real `criud checkpoint`
# of a 1 GiB process, captured mid-dump in a 100x12 tmux pane.
#
# Run as root from the repo (after `make install`); needs tmux, Pillow
# (`.venv/bin/pip install '.[docs]'`) and fonts-dejavu-core.  It starts its
# own daemon on temporary sockets and kills only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
OUT=docs/img
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/criud-shot.XXXXXX)
SESSION=criud-shot-$$
DAEMON=""
BIG=""
cleanup() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    [ -n "$BIG" ] && kill -9 "$BIG" 2>/dev/null || true
    [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

export CRIUD_SOCKET=$TMP/api.sock CRIUD_FD_SOCKET=$TMP/fds.sock
"$PY" -m criud.daemon.cli serve --state-dir "$TMP/state" --criu /usr/local/sbin/criu \
    >"$TMP/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do [ -S "$CRIUD_SOCKET" ] && break; sleep 0.1; done

# The workload: 1 GiB touched, a session leader, stdio on /dev/null.
setsid "$PY" -c '
import time
buf = bytearray(1 << 30)
for i in range(0, len(buf), 4096):
    buf[i] = 1
open("'"$TMP"'/ready", "w").close()
while True:
    time.sleep(1)
' </dev/null >/dev/null 2>&1 &
BIG=$!
disown "$BIG"
for _ in $(seq 300); do [ -e "$TMP/ready" ] && break; sleep 0.1; done

# A plain shell in the pane, `criud` on its PATH, then the command typed in.
tmux new-session -d -s "$SESSION" -x 100 -y 12 \
    "env -i PATH=$PWD/.venv/bin:/usr/bin:/bin TERM=tmux-256color \
     CRIUD_SOCKET=$CRIUD_SOCKET CRIUD_FD_SOCKET=$CRIUD_FD_SOCKET \
     PS1='$ ' bash --norc --noprofile"
sleep 0.5
tmux send-keys -t "$SESSION" "criud checkpoint $BIG --name big" Enter

# Capture mid-dump: the first frame with the dumping phase a third done or more.
CAP=""
for _ in $(seq 400); do
    frame=$(tmux capture-pane -p -e -t "$SESSION")
    plain=$(tmux capture-pane -p -t "$SESSION")
    if grep -q dumping <<<"$plain" && grep -q "B/s" <<<"$plain" &&
        grep -qE '[0-9.]+/[0-9.]+ GB' <<<"$plain" &&
        [ "$(grep -oE '[0-9.]+/[0-9.]+ GB' <<<"$plain" |
            awk -F/ '{print ($1 / $2 >= 0.33)}')" = 1 ]; then
        CAP=$frame
        break
    fi
    sleep 0.02
done
[ -n "$CAP" ] || { echo "no mid-dump frame captured" >&2; exit 1; }
printf '%s\n' "$CAP" >"$TMP/capture.ansi"
# The same frame as plain text: escapes and trailing blanks dropped.
sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/[[:space:]]*$//' "$TMP/capture.ansi" |
    awk 'NF { for (; blank > 0; blank--) print ""; print; next } { blank++ }' \
        >"$OUT/checkpoint-progress.txt"
"$PY" docs/render_ansi.py "$TMP/capture.ansi" "$OUT/checkpoint-progress.png" --cols 100
# Let it finish, and remove what it made.
for _ in $(seq 200); do
    tmux capture-pane -p -t "$SESSION" | grep -q "checkpoint .* done" && break
    sleep 0.1
done
"$PY" -m criud.daemon.cli rm big >/dev/null 2>&1 || true
echo "wrote $OUT/checkpoint-progress.png and $OUT/checkpoint-progress.txt"
