#!/bin/sh
# cli_test.sh MOEC WORKDIR: the moec command line, and inputs meant to break it.
# Every bad input must give exactly one clear diagnostic and exit 1, quickly
# (each run is under `timeout 10`), and never crash (an exit status over 128
# is a signal). Generated inputs go into WORKDIR.
set -u
moec=$1 work=$2
rm -rf "$work"
mkdir -p "$work"
cd "$work" || exit 1
fails=0

# run NAME CMD...: runs CMD with a time limit; out.txt, err.txt, $rc
run() {
  name=$1
  shift
  timeout 10 "$@" >out.txt 2>err.txt
  rc=$?
}

fail() {
  echo "FAIL: $name: $*"
  echo "--- stdout:"; head -c 2000 out.txt; echo "--- stderr:"; head -c 2000 err.txt
  fails=$((fails + 1))
}

# expect RC FILE PATTERN [NERRORS]: the exit status is RC, FILE (out or err)
# matches PATTERN (grep -E; an empty PATTERN: FILE is empty), and stderr holds
# NERRORS `error:` lines.
expect() {
  want=$1 file=$2 pattern=$3 nerr=${4:-}
  if [ "$rc" -eq 124 ]; then fail "timed out (10 s)"; return; fi
  if [ "$rc" -gt 128 ]; then fail "crashed (signal $((rc - 128)))"; return; fi
  if [ "$rc" -ne "$want" ]; then fail "exit status $rc, expected $want"; return; fi
  if [ -z "$pattern" ] && [ -s "$file.txt" ]; then fail "$file is not empty"; return; fi
  if [ -n "$pattern" ] && ! grep -Eq -- "$pattern" "$file.txt"; then
    fail "$file lacks /$pattern/"
    return
  fi
  if [ -n "$nerr" ]; then
    got=$(grep -c ': error: ' err.txt)
    if [ "$got" -ne "$nerr" ]; then fail "$got errors, expected $nerr"; return; fi
  fi
  # a diagnostic is a few lines, whatever the input: nothing is echoed whole
  size=$(wc -c <err.txt)
  if [ "$size" -gt 4000 ]; then fail "stderr is $size bytes"; return; fi
  echo "ok: $name (exit $rc)"
}

good='model m { dim = 64; tokens = 16; ffn f { hidden = 64; } }'

# --- the command line ---
run help "$moec" --help
expect 0 out '^usage: moec check'
run help-short "$moec" -h
expect 0 out '^usage: moec check'
run version "$moec" --version
expect 0 out '^moec [0-9]+\.[0-9]+\.[0-9]+$'
run no-command "$moec"
expect 2 err '^usage: moec check'
run unknown-command "$moec" frobnicate x.moe
expect 2 err "^moec: unknown command 'frobnicate'"
run unknown-option "$moec" check --bogus x.moe
expect 2 err "^moec: unknown option '--bogus'"
run unknown-short-option "$moec" check -z x.moe
expect 2 err "^moec: unknown option '-z'"
run no-files "$moec" check
expect 2 err 'no input files'
printf '%s\n' "$good" >good.moe
run good "$moec" check good.moe
expect 0 err '' 0
run print-two-files "$moec" check --print good.moe good.moe
expect 2 err '--print takes one file'

# --- standard input ---
run stdin-good sh -c "printf '%s\n' '$good' | '$moec' check -"
expect 0 err '' 0
run stdin-bad sh -c "printf 'model m { dim = 63; tokens = 16; }\n' | '$moec' check -"
expect 1 err '^<stdin>:1:17: error: `dim` must be even' 1

# --- files that are not specs ---
mkdir adir
run directory "$moec" check adir
expect 1 err '^adir: error: is a directory; give the path of a \.moe file$' 1
# build reads its spec the same way, and leaves no binary behind
run directory-build "$moec" build adir -o adir-bin
expect 1 err '^adir: error: is a directory; give the path of a \.moe file$' 1
[ -e adir-bin ] && fail "a failed build left adir-bin"
# the binary's directory is checked before anything is compiled
run build-missing-dir "$moec" build good.moe -o no-such-dir/bin
expect 1 err '^moec: error: cannot write no-such-dir/bin: the directory no-such-dir does not exist; create it or choose another -o$' 1
run build-dir-is-file "$moec" build good.moe -o good.moe/bin
expect 1 err '^moec: error: cannot write good.moe/bin: good.moe is not a directory$' 1
run missing "$moec" check no-such-file.moe
expect 1 err '^no-such-file.moe: error: cannot open: No such file or directory' 1
# chmod 000 does not stop root (CAP_DAC_OVERRIDE), and CI runs as root. There
# moec runs by setpriv (util-linux, which tools/install-deps.sh makes sure of)
# as the user nobody, or, where uid 65534 cannot be taken (a user namespace
# that does not map it), as root without capabilities. Each way is tried, not
# assumed: it must be refused the file and still run moec. None working is a
# failure, never a skip.
printf '%s\n' "$good" >unreadable.moe
chmod 000 unreadable.moe
drop=none
for way in "" "setpriv --reuid=65534 --regid=65534 --clear-groups" \
  "setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all"; do
  # shellcheck disable=SC2086 # $way is a command prefix, split on purpose
  if ! $way cat unreadable.moe >/dev/null 2>&1 && $way "$moec" --version >/dev/null 2>&1; then
    drop=$way
    break
  fi
done
if [ "$drop" = none ]; then
  name=unreadable
  : >out.txt
  : >err.txt
  fail "no way to run moec unable to read a chmod 000 file (is setpriv missing, or not permitted here?)"
else
  # shellcheck disable=SC2086
  run "unreadable${drop:+ (by $drop)}" $drop "$moec" check unreadable.moe
  expect 1 err '^unreadable.moe: error: cannot open: Permission denied$' 1
fi
chmod 644 unreadable.moe
: >empty.moe
run empty "$moec" check empty.moe
expect 1 err '^empty.moe: error: empty file' 1
cp "$moec" binary.moe
run binary "$moec" check binary.moe
expect 1 err '^binary.moe:1:[0-9]+: error: NUL byte in spec; this looks like a binary file' 1

# --- inputs meant to break it ---
# a 10 MB line of spaces with a stray `@` at its end: the echo is cut to a window
{ printf 'model m { dim = 64; tokens = 16; '
  head -c 10000000 /dev/zero | tr '\0' ' '
  printf '@ }\n'; } >long-line.moe
run long-line "$moec" check long-line.moe
expect 1 err '^long-line.moe:1:10000034: error: stray `@` in spec' 1
# a 10 MB integer: out of range, quoted cut short
{ printf 'model m { dim = '
  head -c 10000000 /dev/zero | tr '\0' '9'
  printf '; tokens = 16; }\n'; } >long-number.moe
run long-number "$moec" check long-number.moe
expect 1 err '^long-number.moe:1:17: error: integer `9+\.\.\.` is out of range' 1
# 100,000 nested blocks: one error at the `{` past the limit; the parse stops there
{ printf 'model m { dim = 64; tokens = 16;\n'
  yes 'residual {' | head -n 100000 | tr '\n' ' '
  printf 'layernorm;'
  yes '}' | head -n 100000 | tr -d '\n'
  printf '\n}\n'; } >deep.moe
run deep "$moec" check deep.moe
expect 1 err '^deep.moe:2:2815: error: blocks nested too deeply \(limit is 256\)' 1
# integers just past int64, both ways
printf 'model m { dim = 64; tokens = 9223372036854775808; }\n' >int-high.moe
run int-high "$moec" check int-high.moe
expect 1 err '^int-high.moe:1:30: error: integer `9223372036854775808` is out of range' 1
printf 'model m { dim = 64; tokens = -9223372036854775809; }\n' >int-low.moe
run int-low "$moec" check int-low.moe
expect 1 err '^int-low.moe:1:30: error: integer `-9223372036854775809` is out of range' 1
# the largest int64 itself is a valid integer: what stops it is the limit of
# `tokens`, not the number's range
printf 'model m { dim = 64; tokens = 9223372036854775807; ffn f { hidden = 64; } }\n' >int-max.moe
run int-max "$moec" check int-max.moe
expect 1 err '^int-max.moe:1:30: error: `tokens` is 9223372036854775807 \(limit is 2147483647: token indices are 32-bit\)$' 1

if [ "$fails" -ne 0 ]; then
  echo "$fails case(s) failed"
  exit 1
fi
echo "all cases passed"
