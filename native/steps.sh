# Sourced by setup_env.sh and horovod/build_horovod.sh. Our own steps are one line each on
# stdout; what the tools print (pip, apt, compilers) is kept in a log and shown in full only
# when its step fails, so that a real error is not lost among warnings.

say() { printf '== setup: %s\n' "$*"; }

# run_step DESCRIPTION COMMAND...: run COMMAND quietly; on failure print DESCRIPTION, its exit
# status and everything COMMAND wrote, then exit with its status.
run_step() {
    local desc=$1 log rc
    shift
    log=$(mktemp "${TMPDIR:-/tmp}/hvd_signsgd-setup.XXXXXX")
    "$@" >"$log" 2>&1 && { rm -f "$log"; return 0; }
    rc=$?
    {
        printf '== setup: FAILED (exit %d): %s\n' "$rc" "$desc"
        printf -- '-- command: %s\n-- its output:\n' "$*"
        cat "$log"
        printf -- '-- end of output (also in %s)\n' "$log"
    } >&2
    exit "$rc"
}
