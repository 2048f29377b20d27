#!/bin/sh
# Writes examples/data/corpus.txt, the byte-level examples' training text: the
# King James Bible (public domain) from Debian's bible-kjv package, dumped by
# its `bible` program, verse references removed (about 4.3 MB). Generated at
# set-up, never committed. Does nothing when the file is already there.
set -eu
cd "$(dirname "$0")/.."
out=examples/data/corpus.txt
[ -s "$out" ] && exit 0
if ! command -v bible >/dev/null 2>&1; then
  echo "moec: the byte-level examples need Debian's bible-kjv package for their text:" >&2
  echo "moec:   apt-get install -y bible-kjv    (tools/install-deps.sh does this as root)" >&2
  exit 1
fi
mkdir -p examples/data
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
bible -f gen1:1-rev22:21 | sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //' > "$tmp"
[ "$(wc -c < "$tmp")" -gt 1000000 ] || { echo "moec: bible printed too little text" >&2; exit 1; }
mv "$tmp" "$out"
trap - EXIT
echo "moec: wrote $out ($(wc -c < "$out") bytes of the King James Bible)"
