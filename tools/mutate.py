#!/usr/bin/env python3
"""mutate.py — `make mutate`: is the test suite able to catch real bugs?

Applies each deliberate bug of tools/mutations.txt (a "mutation") to a scratch
copy of the tree, rebuilds what it touches and runs the tests that should
catch it. A mutation is caught when at least one of its tests fails; one that
every test passes "survives" and shows a gap in the tests. Prints each
mutation with the tests that caught it, then `mutation score: C of N caught`
as the last line; exits 1 when a mutation survives or an entry is broken.

    make mutate                       every mutation (2 to 4 minutes on 2 busy cores)
    make mutate MUTATIONS=a,b         only these (by name)
    make mutate MUTATE_DIR=/tmp/m     keep the scratch tree in /tmp/m and reuse it
                                      next time (only what changed is rebuilt)
    python3 tools/mutate.py --only NAME --dir /tmp/m --tests '^(unit|model)\.'
                                      which of these tests catch NAME (writing one)
    python3 tools/mutate.py --check   only that every entry finds its code
    python3 tools/mutate.py --help    the options

How it runs: the working tree's files (`git ls-files`: tracked and untracked
but not ignored files, as they are now, uncommitted edits included, plus
examples/data/corpus.txt, which tests read) are copied to a scratch directory,
configured and built once; then the tests of every mutation are run on the
unmutated build (the baseline: a test that fails there proves nothing); then
for each mutation: patch the file, `cmake --build` (only what the file feeds
is rebuilt), `ctest -R TESTS`, put the file back. The scratch directory is
removed at the end, on failure and on Ctrl-C (unless it is MUTATE_DIR).

Adding a mutation: append an entry to tools/mutations.txt (its format is
described at its top): the file, the exact original lines, the bug in their
place, the CTest regex of the tests that must catch it, one line saying what
the bug is. Make it a bug someone could write (an off-by-one, a sign, a
dropped term, a swapped index, a skipped check) that still compiles without
warnings; a mutant that does not build is an error in the list, not a catch.
Find its tests by running a broad set on the mutant (--tests, above), then
keep the fastest one or two that catch it: one test named per mutation also
guards that test (weakened, it lets the mutation survive), and the whole list
must run in under 30 minutes on 2 busy cores. Then run the entry alone
(`make mutate MUTATIONS=name`): it must be caught.

When code moves: the original text must occur exactly once in its file. A
refactor that moves, rewrites or duplicates it makes `make mutate` stop
before building anything, naming the mutation (`--check` does only that
check, in a second); move the entry with the code (its new file and text,
the same bug, its tests run again on it) or, where the code is gone, write
another bug of the same kind for what replaced it.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LIST = os.path.join(ROOT, "tools", "mutations.txt")
# Ignored files the tests read: copied too when they exist.
EXTRA_FILES = ["examples/data/corpus.txt"]
# CTest's limit for tests that set no TIMEOUT of their own (ours all do).
TEST_TIMEOUT_S = 300
FIELDS = ("file", "tests", "bug")


class ListError(Exception):
    """An error in the mutation list: stops the run before anything is built."""


class Mutation:
    def __init__(self, name, line):
        self.name = name
        self.line = line  # where its entry starts, for messages
        self.file = self.tests = self.bug = None
        self.original = self.replacement = None
        # results
        self.status = None  # "caught", "survived", "broken"
        self.caught_by = []
        self.ran = []
        self.note = ""
        self.build_s = self.test_s = 0.0


def shown(path):
    """path relative to the repository when it is inside it."""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith("..") else rel


def parse_list(path):
    """The mutations of the list file at path (its format: the file's header)."""
    muts, cur, block, lines = [], None, None, []
    with open(path, encoding="utf-8") as f:
        text = f.read().split("\n")
    if text and text[-1] == "":
        text.pop()
    for no, raw in enumerate(text, 1):
        where = f"{shown(path)}:{no}"
        if block is not None:  # inside <<< ... === ... >>>: verbatim
            if re.fullmatch(r"== [A-Za-z0-9_.-]+", raw) and no < len(text) and text[no].startswith("file:"):
                # the next entry's header: this block was never closed (a merge that lost its `>>>`)
                raise ListError(f"{where}: mutation {cur.name}: its `<<<` block is not closed by `===` and "
                                f"`>>>` before the next mutation, {raw[3:]}")
            if raw == "===" and block == "original":
                cur.original = "\n".join(lines)
                block, lines = "replacement", []
            elif raw == ">>>" and block == "replacement":
                cur.replacement = "\n".join(lines)
                block, lines = None, []
            else:
                lines.append(raw)
            continue
        if raw.strip() == "" or raw.lstrip().startswith("#"):
            continue
        if raw.startswith("== "):
            cur = Mutation(raw[3:].strip(), where)
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", cur.name):
                raise ListError(f"{where}: a mutation's name is letters, digits, `_`, `.` and `-`: {cur.name!r}")
            muts.append(cur)
            continue
        if cur is None:
            raise ListError(f"{where}: expected `== NAME` to start a mutation, found {raw!r}")
        if raw == "<<<":
            if cur.original is not None:
                raise ListError(f"{where}: mutation {cur.name} has a second `<<<` block")
            block, lines = "original", []
            continue
        m = re.fullmatch(r"(\w+):\s*(.*?)\s*", raw)
        if not m or m.group(1) not in FIELDS:
            raise ListError(f"{where}: expected one of {', '.join(f + ':' for f in FIELDS)} "
                            f"or `<<<` in mutation {cur.name}, found {raw!r}")
        if getattr(cur, m.group(1)) is not None:
            raise ListError(f"{where}: `{m.group(1)}:` given twice in mutation {cur.name}")
        setattr(cur, m.group(1), m.group(2))
    if block is not None:
        raise ListError(f"{cur.line}: mutation {cur.name}: its `<<<` block is not closed by `===` and `>>>`")
    seen = set()
    for mu in muts:
        for f in FIELDS:
            if not getattr(mu, f):
                raise ListError(f"{mu.line}: mutation {mu.name} has no `{f}:`")
        if mu.original is None:
            raise ListError(f"{mu.line}: mutation {mu.name} has no `<<<` original `===` replacement `>>>` block")
        if mu.original.strip() == "":
            raise ListError(f"{mu.line}: mutation {mu.name}: the original text is empty")
        if mu.original == mu.replacement:
            raise ListError(f"{mu.line}: mutation {mu.name}: the replacement is the original")
        try:
            re.compile(mu.tests)
        except re.error as e:
            raise ListError(f"{mu.line}: mutation {mu.name}: `tests:` is not a regex: {e}")
        if mu.name in seen:
            raise ListError(f"{mu.line}: mutation {mu.name} is listed twice")
        seen.add(mu.name)
    return muts


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def check_places(muts, tree):
    """Each original must occur exactly once in its file: a message per one that does not."""
    errors = []
    for mu in muts:
        path = os.path.join(tree, mu.file)
        if not os.path.isfile(path):
            errors.append(f"mutation {mu.name}: {mu.file} does not exist (moved? move the mutation with it)")
            continue
        n = read(path).count(mu.original)
        if n != 1:
            first = mu.original.strip().split("\n")[0].strip()
            errors.append(f"mutation {mu.name}: its original text occurs {n} times in {mu.file}, not once "
                          f"(the code moved or changed: move the mutation with it); it begins {first!r}")
    return errors


# --- the scratch tree ---------------------------------------------------------

def tree_files():
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    files += [f for f in EXTRA_FILES if os.path.isfile(os.path.join(ROOT, f))]
    return sorted(set(files))


def sync_tree(dst):
    """Copies the working tree's files into dst, leaving those already equal
    untouched (so a reused build rebuilds only what changed)."""
    n = 0
    for rel in tree_files():
        src, out = os.path.join(ROOT, rel), os.path.join(dst, rel)
        if os.path.islink(src):
            continue
        if os.path.isfile(out) and os.path.getsize(out) == os.path.getsize(src):
            with open(src, "rb") as a, open(out, "rb") as b:
                if a.read() == b.read():
                    continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy2(src, out)
        os.utime(out)  # newer than any object built from an older copy
        n += 1
    return n


# --- running commands ---------------------------------------------------------

def run(cmd, log, cwd=None):
    """Runs cmd with stdout and stderr appended to the file log; its exit
    status. Interrupted (Ctrl-C, SIGTERM), it kills cmd and its children."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        # its own process group, so that mpirun's and ninja's children go too
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait()
        except BaseException:
            kill_group(p)
            raise


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def tail(path, n=25):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# ctest's result lines: "  3/12 Test  #41: unit.cpu_ops ......***Failed    2.31 sec"
RESULT = re.compile(r"^\s*\d+/\d+ Test\s+#\d+: (\S+) \.*\s*(\**)(.*?)\s+[\d.]+ sec\s*$")


def ctest(build, regex, log, jobs):
    """Runs the tests matching regex; {name: result}, the result 'passed',
    'skipped', 'not run', 'disabled' or 'failed: HOW' ({} when none matches)."""
    start = os.path.getsize(log) if os.path.exists(log) else 0
    run(["ctest", "-R", regex, "-j", str(jobs), "--timeout", str(TEST_TIMEOUT_S), "--output-on-failure"],
        log, cwd=build)
    with open(log, errors="replace") as f:
        f.seek(start)
        text = f.read()
    results = {}
    for line in text.split("\n"):
        m = RESULT.match(line)
        if not m:
            continue
        name, stars, what = m.group(1), m.group(2), m.group(3).strip()
        if not stars and what == "Passed":
            results[name] = "passed"
        elif what in ("Skipped", "Not Run", "Disabled"):  # ran nothing: caught nothing
            results[name] = what.lower()
        else:
            results[name] = "failed: " + (what or "?")
    return results


def test_names(build, regex):
    """The tests whose names match regex, as CTest matches them (CMake's
    regular expressions: no `(?:`, `\\d`, `{n}`; at most 9 groups)."""
    out = subprocess.run(["ctest", "-N", "-R", regex], cwd=build, check=True, capture_output=True,
                         text=True).stdout
    return re.findall(r"^\s*Test\s+#\d+: (\S+)$", out, re.M)


# --- the run --------------------------------------------------------------------

def fmt_s(s):
    return f"{s:.0f} s" if s < 120 else f"{int(s) // 60} min {int(s) % 60:02d} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the top of tools/mutate.py and tools/mutations.txt.")
    ap.add_argument("--list", default=DEFAULT_LIST, help="the mutation list (default: tools/mutations.txt)")
    ap.add_argument("--only", default="", help="comma-separated names: run only these mutations")
    ap.add_argument("--dir", default="", help="the scratch tree, kept and reused (default: a temporary one)")
    ap.add_argument("--tests", default="",
                    help="run these tests (a ctest regex) on every mutant instead of the listed ones: "
                         "to find which tests catch a new mutation")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the tests on the unmutated tree first")
    ap.add_argument("--check", action="store_true",
                    help="only check the list (each original occurs once in its file) and exit")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build and ctest parallelism")
    args = ap.parse_args()

    t0 = time.monotonic()
    try:
        muts = parse_list(args.list)
    except (ListError, OSError) as e:
        print(f"mutate: {e}", file=sys.stderr)
        return 1
    if args.only:
        want = [w for w in args.only.replace(" ", ",").split(",") if w]
        names = {m.name for m in muts}
        unknown = [w for w in want if w not in names]
        if unknown:
            print(f"mutate: no mutation named {', '.join(unknown)} in {shown(args.list)}",
                  file=sys.stderr)
            return 1
        muts = [m for m in muts if m.name in want]
    if args.tests:
        for m in muts:
            m.tests = args.tests
    if not muts:
        print("mutate: no mutations to run", file=sys.stderr)
        return 1

    # the list against the working tree first: a moved mutation stops here
    errors = check_places(muts, ROOT)
    if errors:
        for e in errors:
            print(f"mutate: {e}", file=sys.stderr)
        print(f"mutate: {len(errors)} broken entr{'y' if len(errors) == 1 else 'ies'} in "
              f"{shown(args.list)}; nothing was run", file=sys.stderr)
        return 1
    if args.check:
        print(f"mutate: the {len(muts)} mutations of {shown(args.list)} each find their code once")
        return 0

    keep = bool(args.dir)
    scratch = os.path.abspath(args.dir) if keep else tempfile.mkdtemp(prefix="moec-mutate.")
    os.makedirs(scratch, exist_ok=True)
    src, build = os.path.join(scratch, "src"), os.path.join(scratch, "build")
    log = os.path.join(scratch, "mutate.log")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with it ignored
    current = None  # (path, original text) while a file is mutated
    try:
        if os.path.exists(log):
            os.remove(log)
        print(f"mutate: {len(muts)} mutations; scratch tree {scratch}{' (kept)' if keep else ''}; log {log}",
              flush=True)
        os.makedirs(src, exist_ok=True)
        n = sync_tree(src)
        print(f"mutate: copied {n} files of the working tree (those not already there)", flush=True)

        t = time.monotonic()
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
            if run(["cmake", "-S", src, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], log) != 0:
                print(tail(log), file=sys.stderr)
                print("mutate: configuring the scratch tree failed", file=sys.stderr)
                return 1
        if run(["cmake", "--build", build, "--parallel", str(args.jobs)], log) != 0:
            print(tail(log), file=sys.stderr)
            print("mutate: the unmutated tree does not build", file=sys.stderr)
            return 1
        print(f"mutate: built the unmutated tree in {fmt_s(time.monotonic() - t)}", flush=True)

        every = set()
        for mu in muts:
            names = test_names(build, mu.tests)
            every.update(names)
            if not names:
                mu.status, mu.note = "broken", f"no test matches `{mu.tests}`"
                print(f"mutate: mutation {mu.name}: BROKEN: {mu.note}", flush=True)

        if not args.no_baseline and every:
            t = time.monotonic()
            union = "^(" + "|".join(re.sub(r"([][.^$*+?(){}|\\])", r"\\\1", n) for n in sorted(every)) + ")$"
            res = ctest(build, union, log, args.jobs)
            bad = sorted(k for k, v in res.items() if v.startswith("failed"))
            if bad:
                print(tail(log, 40), file=sys.stderr)
                print(f"mutate: these tests fail on the unmutated tree, so they prove nothing about a "
                      f"mutant: {', '.join(bad)}; fix them first (--no-baseline skips this check)",
                      file=sys.stderr)
                return 1
            print(f"mutate: baseline: the {len(res)} tests pass on the unmutated tree "
                  f"({fmt_s(time.monotonic() - t)})", flush=True)

        # one file's mutations one after another: the file is rebuilt once
        # when it is put back and the next one patched, not twice
        first = {}
        for i, mu in enumerate(muts):
            first.setdefault(mu.file, i)
        order = sorted((m for m in muts if not m.status), key=lambda m: first[m.file])
        for i, mu in enumerate(order, 1):
            head = f"[{i:2d}/{len(order)}] {mu.name}"
            print(f"{head}: {mu.file}: {mu.bug}", flush=True)
            path = os.path.join(src, mu.file)
            text = read(path)
            if text.count(mu.original) != 1:  # checked above; the copy may differ only if edited meanwhile
                mu.status, mu.note = "broken", "its original text is not found once in the scratch copy"
                print(f"{' ' * len(head)}  BROKEN: {mu.note}", flush=True)
                continue
            current = (path, text)
            write(path, text.replace(mu.original, mu.replacement))
            t = time.monotonic()
            with open(log, "a") as f:
                f.write(f"\n===== mutation {mu.name}\n")
            ok = run(["cmake", "--build", build, "--parallel", str(args.jobs)], log) == 0
            mu.build_s = time.monotonic() - t
            if not ok:
                write(path, text)
                current = None
                mu.status, mu.note = "broken", "the mutant does not build (an error in the list)"
                print(tail(log, 15), end="")
                print(f"{' ' * len(head)}  BROKEN: {mu.note}", flush=True)
                continue
            t = time.monotonic()
            res = ctest(build, mu.tests, log, args.jobs)
            mu.test_s = time.monotonic() - t
            write(path, text)
            current = None
            mu.ran = sorted(k for k, v in res.items() if v == "passed")
            mu.caught_by = sorted(k for k, v in res.items() if v.startswith("failed"))
            if not res:
                mu.status, mu.note = "broken", f"no test matches `{mu.tests}`"
            elif mu.caught_by:
                mu.status = "caught"
            else:
                mu.status = "survived"
                idle = sorted(f"{k} ({v})" for k, v in res.items() if v != "passed")
                if idle:
                    mu.note = f"did not run: {', '.join(idle)}"
            timing = f"(build {fmt_s(mu.build_s)}, tests {fmt_s(mu.test_s)})"
            if mu.status == "caught":
                print(f"{' ' * len(head)}  caught by {', '.join(mu.caught_by)} {timing}", flush=True)
            elif mu.status == "survived":
                print(f"{' ' * len(head)}  SURVIVED: {', '.join(mu.ran)} passed {timing}"
                      f"{'; ' + mu.note if mu.note else ''}", flush=True)
            else:
                print(f"{' ' * len(head)}  BROKEN: {mu.note}", flush=True)
    except KeyboardInterrupt:
        print("\nmutate: interrupted", file=sys.stderr)
        return 130
    finally:
        if current:
            write(*current)
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)

    caught = sum(m.status == "caught" for m in muts)
    w = max(len(m.name) for m in muts)
    print(f"\n{'mutation'.ljust(w)}  caught by (or what went wrong)")
    for m in muts:
        if m.status == "caught":
            what = ", ".join(m.caught_by)
        elif m.status == "survived":
            what = f"SURVIVED ({', '.join(m.ran)} passed{'; ' + m.note if m.note else ''})"
        else:
            what = f"BROKEN: {m.note}"
        print(f"{m.name.ljust(w)}  {what}")
    print(f"elapsed {fmt_s(time.monotonic() - t0)}")
    print(f"mutation score: {caught} of {len(muts)} caught")
    return 0 if caught == len(muts) else 1


if __name__ == "__main__":
    sys.exit(main())
