#!/usr/bin/env bash
# install-peers.sh - install the third-party LMTP peers used by the
# end-to-end tests (tests/test_e2e_*.py), non-interactively, on Debian 12:
#
#   postfix        postfix, postqueue, smtp-sink, smtp-source
#   swaks          swaks
#   dovecot-core   dovecot, doveconf
#   dovecot-lmtpd  /usr/lib/dovecot/lmtp
#   cyrus-imapd    /usr/lib/cyrus/bin/lmtpd (a backend that demands LMTP AUTH)
#   sasl2-bin      saslpasswd2 (Cyrus's users for that AUTH)
#   libsasl2-modules    the SASL PLAIN/LOGIN client of Postfix's lmtp
#   libnet-ssleay-perl  swaks --tls (a --no-install-recommends swaks lacks it)
#   postgresql     /usr/lib/postgresql/*/bin/initdb, postgres (the database
#                  routing source's tests start their own servers; no
#                  system cluster is created)
#
#   tools/install-peers.sh          install what is missing (needs root)
#   tools/install-peers.sh --check  only report; exit 1 if something is missing
#
# Idempotent: if every package is installed and every command is present it
# exits 0 without touching apt. Postfix is preseeded to "No configuration", so
# no system instance (/etc/postfix/main.cf) is created; the tests run private
# instances. No package daemon is started: unless /usr/sbin/policy-rc.d
# already exists, a temporary one that exits 101 is installed for the
# duration of the apt run and removed afterwards.
set -euo pipefail

pkgs=(postfix swaks dovecot-core dovecot-lmtpd cyrus-imapd sasl2-bin libsasl2-modules libnet-ssleay-perl postgresql)
# command (or file) -> package that provides it
checks=(
    "postfix:postfix" "postqueue:postfix" "smtp-sink:postfix"
    "swaks:swaks"
    "dovecot:dovecot-core" "doveconf:dovecot-core"
    "/usr/lib/dovecot/lmtp:dovecot-lmtpd"
    "/usr/lib/cyrus/bin/lmtpd:cyrus-imapd" "saslpasswd2:sasl2-bin"
)
export PATH="$PATH:/usr/sbin:/sbin"

missing_pkgs() {
    local p c item miss=()
    for p in "${pkgs[@]}"; do
        if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != "installed" ]; then
            miss+=("$p")
        fi
    done
    for item in "${checks[@]}"; do
        c=${item%%:*}; p=${item#*:}
        case $c in
            /*) [ -x "$c" ] && continue ;;
            *) command -v "$c" >/dev/null 2>&1 && continue ;;
        esac
        case " ${miss[*]:-} " in *" $p "*) ;; *) miss+=("$p") ;; esac
    done
    echo "${miss[@]:-}"
}

missing=$(missing_pkgs)
if [ -z "$missing" ]; then
    echo "install-peers: all present:"
    dpkg-query -W -f='  ${Package} ${Version}\n' "${pkgs[@]}"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "install-peers: missing packages: $missing" >&2
    exit 1
fi
[ "$(id -u)" -eq 0 ] || { echo "install-peers: must run as root (missing: $missing)" >&2; exit 1; }

added_policy=""
cleanup() { if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from lmtp-proxy tools/install-peers.sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    added_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
# postgresql-common creates and starts a "main" cluster unless told not to;
# the tests run private servers (initdb into a temporary directory).
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
fi
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections
echo "install-peers: installing: $missing"
apt-get update -qq
# install the whole set: apt skips what is already there
apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${pkgs[@]}"

missing=$(missing_pkgs)
if [ -n "$missing" ]; then
    echo "install-peers: still missing after install: $missing" >&2
    exit 1
fi
dpkg-query -W -f='  ${Package} ${Version}\n' "${pkgs[@]}"
