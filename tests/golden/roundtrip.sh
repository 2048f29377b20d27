#!/bin/sh
# roundtrip.sh MOEC SPEC PREFIX: SPEC checks clean (no warning either); its
# --print form checks clean and prints itself again unchanged.
set -eu
moec=$1 spec=$2 p=$3
"$moec" check --Werror "$spec"
"$moec" check --print "$spec" > "$p.1.moe"
"$moec" check --Werror --print "$p.1.moe" > "$p.2.moe"
diff -u "$p.1.moe" "$p.2.moe"
"$moec" check --print - < "$p.1.moe" | diff -u "$p.1.moe" -
echo "ok: $spec round-trips"
