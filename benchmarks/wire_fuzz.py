"""The wire decoder fuzz test at benchmark scale: 100,000 inputs and what became of them.

Run from the repository root:

    python -m benchmarks.wire_fuzz                    # 100,000 inputs, writes BENCHMARKS.md
    python -m benchmarks.wire_fuzz --examples 20000 --no-write

Runs ``tests/test_wire_fuzz.py``'s property (the CI test runs 10,000; the same count can be
set for pytest with ``O2O_FUZZ_EXAMPLES``) and counts its outcomes: accepted by message
type, rejected by reason code. Any other exception fails the run with the input that caused it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ["O2O_FUZZ_EXAMPLES"] = str(args.examples)  # read when the test module is imported
    sys.path.insert(0, str(ROOT / "tests"))
    import test_wire_fuzz as fuzz

    t0 = time.perf_counter()
    fuzz.test_the_decoder_accepts_or_rejects_with_a_reason_whatever_arrives()  # raises on a failing input
    elapsed = time.perf_counter() - t0
    total = sum(fuzz.OUTCOMES.values())
    lines = [f"| {name} | {count:,} | {count / total:.1%} |" for name, count in fuzz.OUTCOMES.most_common()]
    print(f"{total:,} inputs in {elapsed:.0f} s, none raised anything but WireError:")
    print("\n".join(lines))
    if args.no_write:
        return
    from benchmarks.report import machine_line, write_section

    import hypothesis

    table = "\n".join(lines)
    write_section(
        "wire_fuzz",
        f"""
## Wire decoder fuzzing (`python -m benchmarks.wire_fuzz`)

The property of `tests/test_wire_fuzz.py` (hypothesis {hypothesis.__version__}) on {total:,} inputs, in
{elapsed:.0f} s ({1e3 * elapsed / total:.1f} ms per input, generation included) on {machine_line()}:
random frames, valid messages of every type with bytes flipped and frames cut, dropped, repeated or
added, valid msgpack headers whose fields hold values of any type and shape, and chunks with NaN,
inf or out-of-range flags. **No input made anything but `WireError` escape `wire.decode`**; every
rejection carried a reason of `wire.REASONS`, and every accepted chunk had the spec's shapes and finite
values. The CI test runs 10,000 inputs (`O2O_FUZZ_EXAMPLES` sets the count).

| outcome | inputs | share |
|---|---|---|
{table}
""",
    )
    print("wrote the 'wire_fuzz' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
