#!/usr/bin/env bash
# Install cytoedge on a workstation with no network, from the wheelhouse folder this
# script sits in (`make wheelhouse` writes it; docs/install.md, INSTALL.md beside it).
#
#   sudo ./install.sh [--bundle FILE.bundle.tar] [--trust-key NAME.pub] [--technician USER]
#   sudo ./install.sh --uninstall [--purge]
#
# It checks the wheelhouse (every file's sha256, this machine's Python, architecture
# and C library), creates the service account, installs the packages into
# /opt/cytoedge/.venv with pip --no-index, writes /etc/cytoedge (kept when present),
# /var/lib/cytoedge, the systemd unit and /usr/local/bin/cytoedge; with the window,
# a desktop launcher and, for --technician USER, an autostart entry at their login;
# with --trust-key (once per key), trusts that public key's bundle signatures (copied into
# /etc/cytoedge/trusted-keys/: the site's policy takes only signed bundles); with
# --bundle, installs that model bundle; then enables the service, starts it
# when a bundle is installed, and ends with `cytoedge doctor` (its exit status).
#
# Every step looks before it acts: running it again changes nothing. A newer
# wheelhouse is an upgrade: the service is stopped first (its current job finishes
# or goes back to the queue; nothing is scored twice or lost), the packages are
# replaced, and the service starts again (its job store migrates forward).
# --uninstall removes the software and keeps /etc/cytoedge and /var/lib/cytoedge
# (scans, results, bundles, job store); --purge removes those and the account too.
#
# Options: --wheelhouse DIR (default: this script's folder), --python PATH (default
# python3.11), --root DIR (install below DIR, paths in the files follow; no account,
# ownership or systemd: for trying it out without root, and for tests).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
wheelhouse=$here
root=""
python=python3.11
bundle=""
trusted=()
technician=""
action=install
purge=0

say() { echo "cytoedge install: $*"; }
die() {
    echo "cytoedge install: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case $1 in
    --wheelhouse) wheelhouse=$(realpath "$2") && shift 2 ;;
    --root) root=$(realpath -m "$2") && shift 2 ;;
    --python) python=$2 && shift 2 ;;
    --bundle) bundle=$(realpath "$2") && shift 2 ;;
    --trust-key) trusted+=("$(realpath "$2")") && shift 2 ;;
    --technician) technician=$2 && shift 2 ;;
    --uninstall) action=uninstall && shift ;;
    --purge) purge=1 && shift ;;
    -h | --help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0" && exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done

OPT=$root/opt/cytoedge
VENV=$OPT/.venv
ETC=$root/etc/cytoedge
DATA=$root/var/lib/cytoedge
UNIT=$root/etc/systemd/system/cytoedge.service
WRAPPER=$root/usr/local/bin/cytoedge
LAUNCHER=$root/usr/share/applications/cytoedge.desktop
ACCOUNT=cytoedge
system=1 # 0 with --root: no account, ownership or systemd
if [ -n "$root" ]; then system=0; fi
if [ $system = 1 ] && [ "$(id -u)" -ne 0 ]; then
    die "run it as root (sudo), or with --root DIR to try it out without root"
fi
# pip only ever looks in the wheelhouse: no index, no configuration of this machine.
for variable in $(compgen -e); do case $variable in PIP_*) unset "$variable" ;; esac done
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

# --- small steps that change something only when it differs -----------------------

# The packaging files name /opt, /etc, /var/lib and /usr/local/bin; below --root they follow.
render() {
    if [ -z "$root" ]; then
        cat "$1"
    else
        sed -e "s#/opt/cytoedge#$OPT#g" -e "s#/etc/cytoedge#$ETC#g" \
            -e "s#/var/lib/cytoedge#$DATA#g" -e "s#/usr/local/bin/cytoedge#$WRAPPER#g" "$1"
    fi
}

# put SOURCE DEST MODE [keep]: DEST gets SOURCE's content and MODE when they differ;
# with "keep", an existing DEST (a site's own configuration) is never touched.
put() {
    local source=$1 dest=$2 mode=$3 keep=${4:-}
    if [ -e "$dest" ] && { [ -n "$keep" ] || cmp -s "$source" "$dest"; }; then
        [ -n "$keep" ] || [ "$(stat -c %a "$dest")" = "$mode" ] || chmod "$mode" "$dest"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" "$source" "$dest.partial"
    mv -f "$dest.partial" "$dest"
    say "wrote $dest"
}

# folder PATH MODE [OWNER]: created when missing; mode and owner set when they differ.
folder() {
    local path=$1 mode=$2 owner=${3:-}
    [ -d "$path" ] || { mkdir -p "$path" && say "created $path"; }
    [ "$(stat -c %a "$path")" = "$mode" ] || chmod "$mode" "$path"
    if [ $system = 1 ] && [ -n "$owner" ] && [ "$(stat -c %U:%G "$path")" != "$owner" ]; then
        chown "$owner" "$path"
    fi
}

# As the service account (what it writes stays the service's); yourself under --root.
as_service() {
    if [ $system = 1 ]; then runuser -u $ACCOUNT -- "$@"; else "$@"; fi
}

# --- uninstall ------------------------------------------------------------------------

if [ $action = uninstall ]; then
    if [ $system = 1 ] && [ -e "$UNIT" ]; then
        systemctl disable --now cytoedge.service 2>/dev/null || true
    fi
    if [ -f "$OPT/autostart" ]; then
        while read -r entry; do rm -f "$entry"; done <"$OPT/autostart"
    fi
    rm -f "$UNIT" "$WRAPPER" "$LAUNCHER"
    rm -rf "$OPT"
    if [ $system = 1 ]; then systemctl daemon-reload; fi
    if [ $purge = 1 ]; then
        rm -rf "$ETC" "$DATA"
        if [ $system = 1 ] && id $ACCOUNT >/dev/null 2>&1; then userdel $ACCOUNT; fi
        if [ $system = 1 ] && getent group $ACCOUNT >/dev/null; then groupdel $ACCOUNT; fi
        say "removed cytoedge, its configuration, its data and its account"
    else
        say "removed cytoedge; kept $ETC (configuration) and $DATA (scans, results," \
            "bundles, job store); --uninstall --purge removes them"
    fi
    exit 0
fi

# --- 1. the wheelhouse fits this machine ----------------------------------------------

[ -f "$wheelhouse/manifest.json" ] || die "no manifest.json in $wheelhouse: point --wheelhouse at the folder \`make wheelhouse\` wrote"
command -v "$python" >/dev/null || die "$python not found: install the system's Python 3.11 with its venv module (Debian: python3.11 python3.11-venv)"
(cd "$wheelhouse" && sha256sum --quiet --check SHA256SUMS) >/dev/null 2>&1 ||
    die "the wheelhouse is damaged or incomplete ($(cd "$wheelhouse" && sha256sum --quiet --check SHA256SUMS 2>&1 | head -1)); copy it again"
read -r role want_python machine glibc_min window appliance <<<"$("$python" -c '
import json, sys
m = json.load(open(sys.argv[1]))
print(m["role"], m["python"], m["machine"], m["glibc_min"] or "-", int(m["window"]), int(m["appliance"]))
' "$wheelhouse/manifest.json")"
have_python=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have_python" = "$want_python" ] || die "the wheelhouse is for Python $want_python; $python is $have_python"
[ "$(uname -m)" = "$machine" ] || die "the wheelhouse is for $machine; this machine is $(uname -m)"
if [ "$glibc_min" != - ]; then
    have_glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
    [ "$(printf '%s\n%s\n' "$glibc_min" "$have_glibc" | sort -V | head -1)" = "$glibc_min" ] ||
        die "the wheelhouse needs C library $glibc_min or newer; this machine has $have_glibc (build it on an older system)"
fi
[ "$appliance" = 1 ] || die "this is a $role wheelhouse, not an appliance: pip install --no-index --find-links $wheelhouse/wheels -r $wheelhouse/requirements.txt into your own environment"
if [ -n "$technician" ] && [ $system = 1 ]; then
    id "$technician" >/dev/null 2>&1 || die "no user $technician on this machine"
fi
for key in "${trusted[@]}"; do
    case $key in *.pub) ;; *) die "--trust-key $key: give the public key, NAME.pub (\`cytoedge bundle keygen\` writes it)" ;; esac
    [ -f "$key" ] || die "--trust-key $key: no such file"
done
say "wheelhouse: role $role, Python $want_python on $machine; every file's sha256 checked"

# --- 2. the service account -------------------------------------------------------------

if [ $system = 1 ]; then
    getent group $ACCOUNT >/dev/null || { groupadd --system $ACCOUNT && say "created group $ACCOUNT"; }
    id $ACCOUNT >/dev/null 2>&1 || {
        useradd --system --gid $ACCOUNT --home-dir /var/lib/cytoedge --no-create-home \
            --shell /usr/sbin/nologin $ACCOUNT && say "created user $ACCOUNT"
    }
fi

# --- 3. packages ----------------------------------------------------------------------------

folder "$OPT" 755
[ -x "$VENV/bin/python" ] || { "$python" -m venv "$VENV" && say "created $VENV"; }
stamp=$(sha256sum "$wheelhouse/manifest.json" | cut -d' ' -f1)
restart=0
if [ "$(cat "$OPT/wheelhouse.sha256" 2>/dev/null)" != "$stamp" ]; then
    if [ $system = 1 ] && systemctl is-active --quiet cytoedge.service; then
        say "stopping the service for the upgrade (its current job finishes or goes back to the queue)"
        systemctl stop cytoedge.service
        restart=1
    fi
    "$VENV/bin/python" -m pip install --quiet --no-index --no-deps --no-cache-dir \
        --find-links "$wheelhouse/wheels" --requirement "$wheelhouse/requirements.txt"
    echo "$stamp" >"$OPT/wheelhouse.sha256"
    say "installed the packages of the $role wheelhouse into $VENV"
fi

# --- 4. configuration, data, the command ----------------------------------------------

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
folder "$ETC" 755
render "$here/cytoedge.env" >"$work/env" && put "$work/env" "$ETC/cytoedge.env" 644 keep
render "$here/cytoedge.toml" >"$work/toml" && put "$work/toml" "$ETC/cytoedge.toml" 644 keep
folder "$ETC/trusted-keys" 755 # public keys: whose bundle signatures this site takes
for key in "${trusted[@]}"; do put "$key" "$ETC/trusted-keys/$(basename "$key")" 644; done
folder "$DATA" 750 $ACCOUNT:$ACCOUNT
folder "$DATA/inbox" 2770 $ACCOUNT:$ACCOUNT # scanners and technicians write here
folder "$DATA/outbox" 2750 $ACCOUNT:$ACCOUNT
folder "$DATA/state" 2770 $ACCOUNT:$ACCOUNT # the window's re-score writes the store
folder "$DATA/bundles" 750 $ACCOUNT:$ACCOUNT
folder "$DATA/logs" 750 $ACCOUNT:$ACCOUNT
# Patient data (results, FHIR bundles, caches, the audit trail, logs) is the service's
# and its group's only: take away any world access an earlier release left (the service
# itself creates folders 0750 and files 0640, umask 0027).
find "$DATA" ! -type l -perm /o=rwx -exec chmod o-rwx {} +
{
    echo '#!/bin/sh'
    echo "# cytoedge with this site's configuration (written by install.sh)."
    echo "CYTOEDGE_CONFIG=\${CYTOEDGE_CONFIG:-$ETC/cytoedge.toml}"
    echo 'export CYTOEDGE_CONFIG'
    if [ $system = 1 ]; then
        echo "# Run by root, it acts as the service account: what it writes (bundles, engines)"
        echo "# stays the service's."
        echo "if [ \"\$(id -u)\" = 0 ]; then exec runuser -u $ACCOUNT -- \"$VENV/bin/cytoedge\" \"\$@\"; fi"
    fi
    echo "exec \"$VENV/bin/cytoedge\" \"\$@\""
} >"$work/wrapper"
put "$work/wrapper" "$WRAPPER" 755

# --- 5. the service ------------------------------------------------------------------------

render "$here/cytoedge.service" >"$work/unit"
if ! cmp -s "$work/unit" "$UNIT" 2>/dev/null; then
    put "$work/unit" "$UNIT" 644
    if [ $system = 1 ]; then systemctl daemon-reload; fi
fi

# --- 6. the window: launcher, autostart at the technician's login ------------------------

if [ "$window" = 1 ]; then
    render "$here/cytoedge.desktop" >"$work/desktop"
    put "$work/desktop" "$LAUNCHER" 644
    if [ -n "$technician" ]; then
        if [ $system = 1 ]; then
            home=$(getent passwd "$technician" | cut -d: -f6)
        else
            home=$root/home/$technician
        fi
        autostart=$home/.config/autostart/cytoedge.desktop
        if [ $system = 1 ]; then
            # Made as the technician: folders of their home stay theirs.
            runuser -u "$technician" -- mkdir -p "$(dirname "$autostart")"
        fi
        put "$work/desktop" "$autostart" 644
        echo "$autostart" >"$work/autostart"
        put "$work/autostart" "$OPT/autostart" 644
        if [ $system = 1 ]; then
            [ "$(stat -c %U "$autostart")" = "$technician" ] || chown "$technician": "$autostart"
            # The window reads the queue and results; they belong to the service's group.
            id -nG "$technician" | grep -qw $ACCOUNT ||
                { usermod -aG $ACCOUNT "$technician" && say "added $technician to group $ACCOUNT (from their next login)"; }
        fi
    fi
    missing=""
    for library in libEGL.so.1 libGL.so.1 libxkbcommon.so.0 libfontconfig.so.1 libdbus-1.so.3 libglib-2.0.so.0; do
        ldconfig -p 2>/dev/null | grep -q "$library" || missing="$missing $library"
    done
    if [ -n "$missing" ]; then
        say "the window needs these system libraries:$missing (Debian: libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0, from the system's install media)"
    fi
fi

# --- 7. a bundle, the service running, doctor --------------------------------------------

if [ -n "$bundle" ]; then
    as_service "$WRAPPER" bundle install "$bundle"
fi
if [ $system = 1 ]; then
    systemctl is-enabled --quiet cytoedge.service || systemctl enable --quiet cytoedge.service
    if [ -L "$DATA/bundles/current" ]; then
        if [ $restart = 1 ] || ! systemctl is-active --quiet cytoedge.service; then
            systemctl start cytoedge.service && say "service started"
        fi
    else
        say "the service starts once a bundle is installed: sudo $0 --bundle FILE.bundle.tar"
    fi
fi
doctor=(doctor)
if [ "$role" = gpu ] && [ -L "$DATA/bundles/current" ]; then doctor+=(--gpu-self-test); fi
status=0
as_service "$WRAPPER" "${doctor[@]}" || status=$?
exit $status
