# Sourced by .ci/deploy and .ci/probe: the project's virtualenv first on PATH, and the hosts' SSH
# key from SSH_PRIVATE_KEY (the key itself, as a CI secret holds it) in a file of mode 600 that
# is removed when the job's shell exits, so the key never outlives the job. Without it, the key
# comes from ANSIBLE_PRIVATE_KEY_FILE or the SSH agent, as for a person at a terminal.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH"
if [[ -n "${SSH_PRIVATE_KEY:-}" ]]; then
    _ci_key=$(mktemp)
    trap 'rm -f "$_ci_key"' EXIT
    printf '%s\n' "$SSH_PRIVATE_KEY" >"$_ci_key"
    export ANSIBLE_PRIVATE_KEY_FILE=$_ci_key
fi
