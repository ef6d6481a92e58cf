#!/usr/bin/env bash
# Debian's SLURM + munge packages for tests/test_slurm_local.py (a real local SLURM cluster of emulated
# nodes): only as root with apt-get, and only when they are missing. Never fails: without them that test
# skips and says why.
if command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: not root or no apt-get: SLURM not installed (tests/test_slurm_local.py will skip)"
  exit 0
fi
echo "install_slurm: apt-get install slurmd slurmctld slurm-client munge (for the real-SLURM test)"
export DEBIAN_FRONTEND=noninteractive
if timeout 900 apt-get install -y -q slurmd slurmctld slurm-client munge >/tmp/commopt-slurm-install.log 2>&1 \
   || { timeout 900 apt-get update -q >>/tmp/commopt-slurm-install.log 2>&1 \
        && timeout 900 apt-get install -y -q slurmd slurmctld slurm-client munge >>/tmp/commopt-slurm-install.log 2>&1; }; then
  echo "install_slurm: installed"
else
  echo "install_slurm: could not install SLURM (see /tmp/commopt-slurm-install.log); its test will skip"
fi
exit 0
