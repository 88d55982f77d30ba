# Sourced by scripts/*.sh from the repository root: they install packages and the extension, so they
# run as root.  Run by another user, the script re-runs itself through sudo
# (keeping FIREWORKS_API_KEY and CI); where there is no sudo (a container
# whose user is not root) it says what to do.
fw_require_root()
{
	[ "$(id -u)" -eq 0 ] && return 0
	if command -v sudo >/dev/null 2>&1; then
		exec sudo --preserve-env=FIREWORKS_API_KEY,CI bash "$(pwd)/scripts/$(basename "$0")" "$@"
	fi
	echo "$(basename "$0"): must run as root (it installs packages and the extension), and sudo is not installed: run it as root" >&2
	exit 1
}
