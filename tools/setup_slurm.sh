#!/usr/bin/env bash
# Install SLURM (slurmctld + slurmd + client commands) and munge, for the SLURM tests.
#
#   tools/setup_slurm.sh     # idempotent; returns at once when everything is installed
#
# Only for a developer box or CI machine: root on Debian/Ubuntu, Debian's slurm-wlm (22.05 on
# bookworm) with its pmix plugin. On a real cluster SLURM is the site's: never run this there.
# Exit status: 0 installed (or already there), 1 install failed, 3 cannot install here
# (not root, or no apt-get) -- the test fixture turns 3 into a visible skip.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge)

log() { printf '[setup_slurm] %s\n' "$*" >&2; }

have_slurm() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

if have_slurm; then
    log "SLURM already installed ($(slurmctld -V))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    log "cannot install SLURM: not root (run as root, or install slurm-wlm and munge yourself)"
    exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "cannot install SLURM: no apt-get on this machine (install slurm-wlm and munge yourself)"
    exit 3
fi

log "installing ${PACKAGES[*]} from the distribution's packages"
export DEBIAN_FRONTEND=noninteractive
# Packages' post-install scripts must not try to start daemons inside containers.
POLICY=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod +x "$POLICY" && made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
if ! have_slurm; then
    log "ERROR: packages installed but slurmctld/slurmd/sbatch/munged are still missing"
    exit 1
fi
log "installed: $(slurmctld -V)"
