#!/usr/bin/env python3
"""verify_examples.py — checks every example of docs/LANGUAGE.md with moec.

    python3 docs/verify_examples.py [MOEC] [DOC]

MOEC defaults to build/compiler/moec, DOC to docs/LANGUAGE.md. Each ```moe block
is written to a temporary directory, under the name in its first line when that
is a comment `# NAME.moe ...` (else snippetN.moe). If the next fenced block is a
```console block starting with `$ moec ...`, that command is run there and its
output (stderr, then stdout) must equal the rest of the block; otherwise
`moec check --Werror` must accept the spec silently. A ```console block whose
file is not a ```moe block of the page (`switch8.moe`, `gpt_moe_bytes.moe`) is
run on the copy in examples/. Exit status 0 when every example passes.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
moec = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(root, "build/compiler/moec")
doc = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "docs/LANGUAGE.md")

blocks = []  # (lang, first line number, text)
lines = open(doc, encoding="utf-8").read().split("\n")
i = 0
while i < len(lines):
    m = re.match(r"^```(\w*)\s*$", lines[i])
    if m and m.group(1):
        start = i + 1
        j = start
        while not lines[j].startswith("```"):
            j += 1
        blocks.append((m.group(1), start + 1, "\n".join(lines[start:j]) + "\n"))
        i = j + 1
    else:
        i += 1

failures = 0
checked = 0
with tempfile.TemporaryDirectory() as tmp:
    for f in os.listdir(os.path.join(root, "examples")):
        if f.endswith(".moe"):
            shutil.copy(os.path.join(root, "examples", f), tmp)
    n = 0
    for k, (lang, line, text) in enumerate(blocks):
        if lang == "moe":
            n += 1
            first = text.split("\n", 1)[0]
            m = re.match(r"#\s*([A-Za-z0-9_]+\.moe)\b", first)
            name = m.group(1) if m else f"snippet{n}.moe"
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            if nxt and nxt[0] == "console" and nxt[2].startswith("$ moec "):
                continue  # checked with its console block
            r = subprocess.run([moec, "check", "--Werror", name], cwd=tmp,
                               capture_output=True, text=True)
            checked += 1
            if r.returncode != 0 or r.stderr:
                failures += 1
                print(f"{doc}:{line}: {name} is not accepted (exit {r.returncode}):\n{r.stderr}")
        elif lang == "console" and text.startswith("$ moec "):
            cmd, want = text.split("\n", 1)
            argv = shlex.split(cmd[2:])
            argv[0] = moec
            r = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
            checked += 1
            got = r.stderr + r.stdout
            if got != want:
                failures += 1
                print(f"{doc}:{line}: output of `{cmd[2:]}` differs")
                for d in __import__("difflib").unified_diff(
                        want.splitlines(), got.splitlines(), "doc", "moec", lineterm=""):
                    print("  " + d)

print(f"{checked} examples checked, {failures} failed")
sys.exit(1 if failures else 0)
