#!/usr/bin/env bash
# deploy/test-units.sh: check deploy/criud.socket and deploy/criud.service with
# `systemd-analyze verify`. Exits 0 with "skipped: ..." when systemd-analyze is
# not installed; needs neither root nor a running systemd.
#
# The units are verified unmodified, inside a throwaway root (--root): a copy
# of the host's system units (for sockets.target and friends), the two criud
# units, and a stub executable at the unit's ExecStart path, because verify
# insists that the ExecStart binary exists and a test machine need not have
# criud installed there. Nothing outside the temporary directory is touched.
#
# systemd-analyze verify exits 0 on most problems it finds (unknown keys,
# unparsable values) and only prints them, so any message about a criud unit
# counts as a failure here.
set -euo pipefail

src=${BASH_SOURCE[0]}
[[ $src == */* ]] || src=./$src
here=$(cd -- "${src%/*}" && pwd)
units=(criud.socket criud.service)

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "skipped: systemd-analyze not installed"
    exit 0
fi

for u in "${units[@]}"; do
    [[ -f $here/$u ]] || {
        echo "test-units: $here/$u is missing" >&2
        exit 1
    }
done

if ! systemd-analyze verify --help 2>&1 | grep -q -- '--root'; then
    # systemd < 250: no --root, so the ExecStart binary must exist on the host.
    exe=$(sed -n 's/^ExecStart=[-@:+!]*\([^ ]*\).*/\1/p' "$here/criud.service" | head -n 1)
    if [[ ! -x $exe ]]; then
        echo "skipped: systemd-analyze verify lacks --root and $exe is not installed"
        exit 0
    fi
    root_args=()
    targets=("$here/criud.socket" "$here/criud.service")
else
    root=$(mktemp -d "${TMPDIR:-/tmp}/criud-test-units.XXXXXX")
    trap 'rm -rf -- "$root"' EXIT
    mkdir -p "$root/usr/lib/systemd/system" "$root/etc/systemd/system"
    for d in /usr/lib/systemd/system /lib/systemd/system; do
        if [[ -d $d ]]; then
            cp -rT "$d" "$root/usr/lib/systemd/system"
            break
        fi
    done
    cp "$here/criud.socket" "$here/criud.service" "$root/etc/systemd/system/"
    # A stub at every absolute Exec*= path of the service.
    sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' "$here/criud.service" |
        while read -r exe; do
            mkdir -p "$root$(dirname "$exe")"
            printf '#!/bin/sh\nexit 0\n' >"$root$exe"
            chmod 0755 "$root$exe"
        done
    root_args=(--root="$root")
    targets=("${units[@]}")
fi

rc=0
out=$(systemd-analyze verify "${root_args[@]}" "${targets[@]}" 2>&1) || rc=$?
if [[ -n $out ]]; then
    printf '%s\n' "$out"
fi
if ((rc != 0)); then
    echo "test-units: FAIL: systemd-analyze verify exited $rc" >&2
    exit 1
fi
if grep -qE 'criud\.(socket|service)' <<<"$out"; then
    echo "test-units: FAIL: systemd-analyze verify reported problems in the criud units" >&2
    exit 1
fi
echo "ok: systemd-analyze verify ${units[*]}"
