#!/bin/sh
# generate_test.sh MODE MOEC SRCDIR WORKDIR — `--generate` of models with
# attention, built by moec and run on the cpu as a user runs them.
#   copy  a byte model trained on the copy task (records of 15 random letters,
#         `|`, the same letters, a newline; seq_test.sh's) generates 300 bytes
#         after a prompt of one record's first half: one token's forward per
#         byte through the key/value cache (exec.h's moert_exec_decode), far
#         past seq = 64, where the cache is a ring of the last 64 bytes. The
#         model's records must copy: the prompt's letters, then the records it
#         makes up itself, at least 80% of their letters (1/26 by chance).
set -u
mode=$1 moec=$2 src=$3 work=$4
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
fail() { echo "FAIL: $mode: $*"; exit 1; }
export OPENBLAS_NUM_THREADS=1

case $mode in
copy)
  awk 'BEGIN { srand(5); for (r = 0; r < 20000; r++) { s = "";
         for (i = 0; i < 15; i++) s = s sprintf("%c", 97 + int(rand() * 26)); printf "%s|%s\n", s, s } }' > copy.txt
  cat > copy.moe <<'EOF'
model copy {
  dim = 64; tokens = 1024; vocab = 256; seq = 64; dtype = fp32;
  repeat 2 {
    residual { rmsnorm; attention a { heads = 4; } }
    residual { rmsnorm; ffn f { hidden = 128; activation = gelu; } }
  }
}
train { steps = 200; lr = 3e-3; warmup = 20; seed = 1; data = bytes("copy.txt"); eval_every = 200; log_every = 50; }
EOF
  "$moec" build copy.moe -o copy >/dev/null || fail "moec build"
  prompt="qwertyuiopasdfg|"
  ./copy --backend cpu --quiet --generate 300 --prompt "$prompt" > out.txt 2>err.txt || fail "run: $(tail -3 err.txt)"
  # the sample: the line after "sample (prompt in brackets):", then the lines after it
  sed -n '/^sample (prompt in brackets):$/,$p' out.txt | tail -n +2 > sample.txt
  head -1 sample.txt | grep -q "^\[$prompt\]" || fail "the sample does not start with the prompt: $(head -1 sample.txt)"
  [ "$(wc -c < sample.txt)" -ge $((300 + ${#prompt} + 2)) ] || fail "fewer than 300 bytes: $(cat sample.txt)"
  cat sample.txt
  awk -v p="$prompt" '
    NR == 1 { line = substr($0, length(p) + 3); want = substr(p, 1, 15)   # after "[prompt]"
              for (i = 1; i <= 15; i++) first += substr(line, i, 1) == substr(want, i, 1); next }
    length($0) == 31 && substr($0, 16, 1) == "|" && /^[a-z]*\|[a-z]*$/ { n++; for (i = 1; i <= 15; i++) same += substr($0, i, 1) == substr($0, 16 + i, 1) }
    END { printf "the prompt copied: %d of 15 letters; %d records made up, %d of %d letters copied\n",
                 first, n, same, 15 * n
          exit !(first >= 13 && n >= 4 && same >= 0.8 * 15 * n) }' sample.txt ||
    fail "the generated text does not copy (the decode path, or its cache past seq, is wrong)"
  echo "ok: generating 300 bytes one token at a time with the cache, far past seq = 64, the model copies" ;;

*) fail "unknown mode" ;;
esac
