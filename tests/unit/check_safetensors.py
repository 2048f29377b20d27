#!/usr/bin/env python3
"""check_safetensors.py — moec's safetensors against Hugging Face's `safetensors`.

    check_safetensors.py TEST_CHECKPOINT WORK_DIR

1. `TEST_CHECKPOINT --write-crosscheck WORK_DIR` writes c_numpy.safetensors (every
   dtype numpy has) and c_all.safetensors (the same plus BF16). The first is loaded
   with safetensors.numpy.load_file; the second, which numpy cannot hold, goes
   through safetensors.deserialize (the same Rust validation), its BF16 bytes
   widened to float32 here. Every value is compared with what the C side wrote.
2. This script writes py.safetensors with safetensors.numpy.save_file, and
   `TEST_CHECKPOINT --read-crosscheck WORK_DIR/py.safetensors` checks its values.

Exit 0: all agree. Exit 1: a difference (printed). Exit 77: the Python packages
are not installed (CTest reports the test as skipped)."""

import os
import subprocess
import sys

try:
    import numpy as np
    import safetensors
    from safetensors.numpy import load_file, save_file
except ImportError as e:
    print(f"SKIP: Python's safetensors or numpy is not installed ({e}); "
          "run `pip install safetensors numpy` to enable this cross-check")
    sys.exit(77)


def expected(with_bf16):
    """What test_checkpoint.c's sample_fill writes, in numpy terms."""
    t = {
        "layer.0.f32": (np.arange(6, dtype=np.float32) * 0.25 - 1).reshape(2, 3),
        "i32": np.array([i * 1000 - 7 for i in range(3)], dtype=np.int32),
        "i64": np.array([(i - 2) * (1 << 40) + i for i in range(4)], dtype=np.int64).reshape(2, 2),
        "f16": np.array([1.0, -2.0, 0.5, 65504.0], dtype=np.float16).reshape(1, 2, 2),
        "f64": np.array([3.141592653589793, -1e300], dtype=np.float64),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "i16": np.array([-32768, 12345], dtype=np.int16),
        "u8": np.array([0, 50, 100, 150, 200], dtype=np.uint8),
        "u16": np.array([65535, 1], dtype=np.uint16),
        "u32": np.array([4000000000, 3], dtype=np.uint32),
        "u64": np.array([2**64 - 1, 42], dtype=np.uint64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 5), dtype=np.float32),
    }
    if with_bf16:
        # 1.0, -2.5, 0.15625 and 0x7F61 << 16 as float32
        bits = np.array([0x3F80, 0xC020, 0x3E20, 0x7F61], dtype=np.uint32) << 16
        t["bf16"] = bits.view(np.float32)
    return t


def compare(name, got, want, failures):
    if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
        failures.append(f"{name}: got {got.dtype}{list(got.shape)} {got.tolist()}, "
                        f"want {want.dtype}{list(want.shape)} {want.tolist()}")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    exe, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    failures = []

    r = subprocess.run([exe, "--write-crosscheck", work], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL: {exe} --write-crosscheck: {r.stdout}{r.stderr}")
        return 1

    # 1a. numpy's loader on the file without BF16.
    path = os.path.join(work, "c_numpy.safetensors")
    loaded = load_file(path)
    want = expected(False)
    if set(loaded) != set(want):
        failures.append(f"{path}: tensors {sorted(loaded)}, want {sorted(want)}")
    for name in want:
        if name in loaded:
            compare(name, loaded[name], want[name], failures)
    with safetensors.safe_open(path, framework="np") as f:
        meta = f.metadata()
    if meta != {"format": "pt", "writer": "moec"}:
        failures.append(f"{path}: metadata {meta}")

    # 1b. The Rust deserializer on the file with BF16.
    path = os.path.join(work, "c_all.safetensors")
    with open(path, "rb") as fh:
        raw = fh.read()
    want = expected(True)
    views = dict(safetensors.deserialize(raw))
    if set(views) != set(want):
        failures.append(f"{path}: tensors {sorted(views)}, want {sorted(want)}")
    np_dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
                "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
    for name, v in views.items():
        if name not in want:
            continue
        if v["dtype"] == "BF16":
            got = (np.frombuffer(bytes(v["data"]), dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            got = np.frombuffer(bytes(v["data"]), dtype=np_dtype[v["dtype"]])
        compare(name, got.reshape(v["shape"]), want[name], failures)

    # 2. A file written by Python, read by moec.
    path = os.path.join(work, "py.safetensors")
    save_file({
        "a": (np.arange(6, dtype=np.float32) * 0.5).reshape(2, 3),
        "b": np.array([-3, 1 << 40], dtype=np.int64),
        "c": np.arange(10, dtype=np.uint8),
        "d": np.array([1.0, -2.0], dtype=np.float16),
        "e": np.zeros((0, 3), dtype=np.int32),
    }, path, metadata={"format": "np", "writer": "python"})
    r = subprocess.run([exe, "--read-crosscheck", path], capture_output=True, text=True)
    if r.returncode != 0:
        failures.append(f"moec reading {path}: {r.stdout}{r.stderr}".strip())

    for f in failures:
        print("FAIL:", f)
    print(f"check_safetensors: {0 if failures else 1} passed, {1 if failures else 0} failed "
          f"(safetensors {safetensors.__version__}, numpy {np.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
